"""The domain events gateways publish, and their codec.

Producer and projector both go through this module: encode() writes exactly what decode()
accepts, and decode() turns anything else into an InvalidEvent with a reason, never an
exception of another kind, so a poison record can always be dead-lettered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from google.protobuf.message import DecodeError

from connection_tracker.protogen.conntrack.events.v1 import events_pb2 as pb
from connection_tracker.timeutil import NANOS_PER_SECOND, to_ns, to_timestamp

SCHEMA_VERSION: Final = 1
EVENT_TYPE: Final = "conntrack.events.v1.ConnectionEvent"
CONTENT_TYPE: Final = "application/x-protobuf"

# Record headers every published event carries (see proto/conntrack/events/v1/events.proto).
HEADERS: Final[tuple[tuple[str, bytes], ...]] = (
    ("content-type", CONTENT_TYPE.encode()),
    ("event-type", EVENT_TYPE.encode()),
    ("schema-version", str(SCHEMA_VERSION).encode()),
)

# Times outside this window cannot come from a working gateway clock: 2000-01-01 .. 2100-01-01.
MIN_TIME_NS: Final = 946_684_800 * NANOS_PER_SECOND
MAX_TIME_NS: Final = 4_102_444_800 * NANOS_PER_SECOND
MAX_ID_LENGTH: Final = 255


@dataclass(frozen=True, slots=True)
class Connected:
    source_ip: str
    user_agent: str


@dataclass(frozen=True, slots=True)
class Activity:
    frames: int = 0


@dataclass(frozen=True, slots=True)
class Disconnected:
    status_code: int = 0
    reason: str = ""


Payload = Connected | Activity | Disconnected


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    connection_id: str
    gateway_id: str
    occurred_at_ns: int
    payload: Payload

    @property
    def kind(self) -> str:
        return type(self.payload).__name__.lower()


class InvalidEvent(ValueError):
    """A record that is not a valid event; the message says why."""


def encode(event: Event) -> bytes:
    msg = pb.ConnectionEvent(
        schema_version=SCHEMA_VERSION,
        event_id=event.event_id,
        connection_id=event.connection_id,
        gateway_id=event.gateway_id,
        occurred_at=to_timestamp(event.occurred_at_ns),
    )
    p = event.payload
    if isinstance(p, Connected):
        msg.connected.identity.source_ip = p.source_ip
        msg.connected.identity.user_agent = p.user_agent
    elif isinstance(p, Activity):
        msg.activity.frames = p.frames
    else:
        msg.disconnected.status_code = p.status_code
        msg.disconnected.reason = p.reason
    return msg.SerializeToString()


# Upcasters: UPCASTERS[v] turns a message written with schema version v into version v + 1, so
# history written by old producers keeps replaying after the schema changes. Version 1 is the
# first, so there is nothing to upcast yet; a future version 2 adds UPCASTERS[1] and bumps
# SCHEMA_VERSION (tests/unit/test_event_fixtures.py keeps a stored v1 log replaying).
Upcaster = Callable[[pb.ConnectionEvent], pb.ConnectionEvent]
UPCASTERS: dict[int, Upcaster] = {}


def upcast(msg: pb.ConnectionEvent) -> pb.ConnectionEvent:
    """Bring a decoded message to SCHEMA_VERSION, or raise InvalidEvent."""
    version = msg.schema_version
    if version > SCHEMA_VERSION:
        raise InvalidEvent(f"schema_version {version} is newer than this reader ({SCHEMA_VERSION})")
    if version < 1:
        raise InvalidEvent("schema_version is missing")
    while version < SCHEMA_VERSION:
        step = UPCASTERS.get(version)
        if step is None:
            raise InvalidEvent(f"no upcaster from schema_version {version}")
        msg = step(msg)
        version += 1
        msg.schema_version = version
    return msg


def decode(value: bytes | None, key: bytes | None = None) -> Event:
    """Decode and validate one record. Raises InvalidEvent (only) for anything unusable."""
    if value is None:
        raise InvalidEvent("record has no value")
    msg = pb.ConnectionEvent()
    try:
        msg.ParseFromString(value)
    except (DecodeError, RecursionError) as exc:
        raise InvalidEvent(f"not a ConnectionEvent protobuf: {exc}") from None
    msg = upcast(msg)
    for name in ("event_id", "connection_id", "gateway_id"):
        v = getattr(msg, name)
        if not v:
            raise InvalidEvent(f"{name} is missing")
        if len(v) > MAX_ID_LENGTH:
            raise InvalidEvent(f"{name} is longer than {MAX_ID_LENGTH} characters")
    if key is not None and key != msg.connection_id.encode():
        raise InvalidEvent("record key does not equal connection_id")
    if not msg.HasField("occurred_at"):
        raise InvalidEvent("occurred_at is missing")
    if not 0 <= msg.occurred_at.nanos < NANOS_PER_SECOND:
        raise InvalidEvent("occurred_at.nanos is out of range")
    at = to_ns(msg.occurred_at)
    if not MIN_TIME_NS <= at < MAX_TIME_NS:
        raise InvalidEvent("occurred_at is outside 2000-01-01..2100-01-01")
    which = msg.WhichOneof("kind")
    payload: Payload
    if which == "connected":
        ident = msg.connected.identity
        payload = Connected(source_ip=ident.source_ip, user_agent=ident.user_agent)
    elif which == "activity":
        payload = Activity(frames=msg.activity.frames)
    elif which == "disconnected":
        payload = Disconnected(
            status_code=msg.disconnected.status_code, reason=msg.disconnected.reason
        )
    else:
        raise InvalidEvent("event kind is missing or unknown")
    # The read model must be able to store what decode() accepts (PostgreSQL text cannot hold
    # NUL; an INTEGER column holds any 16-bit close code): otherwise one event stalls a partition.
    if isinstance(payload, Disconnected) and payload.status_code > 0xFFFF:
        raise InvalidEvent("disconnected.status_code is not a 16-bit WebSocket close code")
    texts = (msg.event_id, msg.connection_id, msg.gateway_id, *_payload_texts(payload))
    if any("\x00" in t for t in texts):
        raise InvalidEvent("a text field contains a NUL character")
    return Event(msg.event_id, msg.connection_id, msg.gateway_id, at, payload)


def _payload_texts(payload: Payload) -> tuple[str, ...]:
    if isinstance(payload, Connected):
        return (payload.source_ip, payload.user_agent)
    if isinstance(payload, Disconnected):
        return (payload.reason,)
    return ()
