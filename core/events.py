"""The domain events gateways publish, and their codec.

Producer and projector both go through this module: encode() writes exactly what decode()
accepts, and decode() turns anything else into an InvalidEvent with a reason, never an
exception of another kind, so a poison record can always be dead-lettered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Final, NoReturn

from google.protobuf.message import DecodeError

from conntrack.core.ids import MAX_ID_LENGTH, id_problem
from conntrack.core.labels import Labels, labels_problem, normalized
from conntrack.core.protogen.conntrack.events.v1 import events_pb2 as pb
from conntrack.core.timeutil import NANOS_PER_SECOND, to_timestamp

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


@dataclass(frozen=True, slots=True)
class Connected:
    source_ip: str
    user_agent: str
    # The gateway node holding the socket, and which start of it ("" and 0: no node role).
    node_id: str = ""
    node_incarnation: int = 0
    # Who the connection is for ("": unknown) and its labels, sorted by key (core/labels.py).
    principal: str = ""
    labels: Labels = ()


@dataclass(frozen=True, slots=True)
class Activity:
    frames: int = 0


class Cause(IntEnum):
    """Who ended a connection (Disconnected.cause in events.proto; the lifecycle stream tells
    it). A newer gateway's value this reader does not know is kept as its number."""

    UNSPECIFIED = pb.Disconnected.CAUSE_UNSPECIFIED
    CLIENT_CLOSED = pb.Disconnected.CLIENT_CLOSED
    DISCONNECTED_BY_API = pb.Disconnected.DISCONNECTED_BY_API
    GATEWAY_SHUTDOWN = pb.Disconnected.GATEWAY_SHUTDOWN
    IDLE_TIMEOUT = pb.Disconnected.IDLE_TIMEOUT
    MAX_LIFETIME = pb.Disconnected.MAX_LIFETIME
    GATEWAY_ERROR = pb.Disconnected.GATEWAY_ERROR
    NODE_FENCED = pb.Disconnected.NODE_FENCED


@dataclass(frozen=True, slots=True)
class Disconnected:
    status_code: int = 0
    reason: str = ""
    # A Cause, or a newer writer's number (not part of the read model's row).
    cause: int = Cause.UNSPECIFIED


@dataclass(frozen=True, slots=True)
class NodeStarted:
    """A gateway node's start: its connections of older incarnations are gone."""

    node_id: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class NodeHeartbeat:
    """A gateway node is alive (its connections stay while it is heard from within the lease)."""

    node_id: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class NodeFenced:
    """The lifecycle role's decision that a node's incarnations up to `incarnation` are lost
    (the node was silent for longer than the lease): their connections are closed for good,
    whatever the node says of them later (docs/lifecycle.md)."""

    node_id: str
    incarnation: int


NodePayload = NodeStarted | NodeHeartbeat | NodeFenced
NODE_PAYLOADS: Final = (NodeStarted, NodeHeartbeat, NodeFenced)
Payload = Connected | Activity | Disconnected | NodeStarted | NodeHeartbeat | NodeFenced


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    connection_id: str
    gateway_id: str
    occurred_at_ns: int
    payload: Payload

    @property
    def kind(self) -> str:
        # The projector counts events by kind in every batch: a lookup, not string work.
        payload_type = type(self.payload)
        return _KIND_NAMES.get(payload_type) or payload_type.__name__.lower()


_KIND_NAMES: Final[dict[type, str]] = {
    Connected: "connected",
    Activity: "activity",
    Disconnected: "disconnected",
    NodeStarted: "node_started",
    NodeHeartbeat: "node_heartbeat",
    NodeFenced: "node_fenced",
}


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
        msg.node_id = p.node_id
        msg.node_incarnation = p.node_incarnation
        msg.connected.principal = p.principal
        msg.connected.labels.update(p.labels)
    elif isinstance(p, Activity):
        msg.activity.frames = p.frames
    elif isinstance(p, Disconnected):
        msg.disconnected.status_code = p.status_code
        msg.disconnected.reason = p.reason
        msg.disconnected.cause = p.cause  # type: ignore[assignment]
    else:
        msg.node_id = p.node_id
        msg.node_incarnation = p.incarnation
        if isinstance(p, NodeStarted):
            msg.node_started.SetInParent()
        elif isinstance(p, NodeFenced):
            msg.node_fenced.SetInParent()
        else:
            msg.node_heartbeat.SetInParent()
    return msg.SerializeToString()


def record_key(event: Event) -> bytes:
    """The record key an event is published under: its connection, or for a node's own events,
    its node."""
    p = event.payload
    if isinstance(p, NODE_PAYLOADS):
        return p.node_id.encode()
    return event.connection_id.encode()


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


EventTuple = tuple[str, str, str, int, Payload]
"""An event as a plain tuple, (event_id, connection_id, gateway_id, occurred_at_ns, payload):
what decode_tuple() returns and fold_tuples() (core/fold.py) folds. Event(*t) is
the event."""


def decode(value: bytes | None, key: bytes | None = None) -> Event:
    """Decode and validate one record. Raises InvalidEvent (only) for anything unusable."""
    return _new_event(*decode_tuple(value, key))


def decode_tuple(value: bytes | None, key: bytes | None = None) -> EventTuple:
    """decode() without building the Event: the same checks, the same InvalidEvent reasons.

    For a consumer's hot loop (the projector's batches): a tuple costs a fraction of an Event,
    and conntrack.core.fold.fold_tuples() folds these tuples directly."""
    # The projector's hot path (BENCHMARKS.md): every field is read from the message once
    # (each read of a protobuf string builds a new str), and the common case is accepted by
    # one cheap combined test per group; only a rejected record goes through the _reject_*
    # functions, which repeat the checks in their documented order to name the first failure.
    if value is None:
        raise InvalidEvent("record has no value")
    try:
        msg = _parse(value)
    except (DecodeError, RecursionError) as exc:
        raise InvalidEvent(f"not a ConnectionEvent protobuf: {exc}") from None
    if msg.schema_version != SCHEMA_VERSION:
        msg = upcast(msg)
    event_id = msg.event_id
    connection_id = msg.connection_id
    gateway_id = msg.gateway_id
    if not connection_id and msg.node_id:
        return _decode_node_event(msg, key)
    if not (
        event_id
        and connection_id
        and gateway_id
        and len(event_id) <= MAX_ID_LENGTH
        and len(connection_id) <= MAX_ID_LENGTH
        and len(gateway_id) <= MAX_ID_LENGTH
    ):
        _reject_ids(event_id, connection_id, gateway_id)
    if key is not None and key != connection_id.encode():
        raise InvalidEvent("record key does not equal connection_id")
    ts = msg.occurred_at
    nanos = ts.nanos
    at = ts.seconds * NANOS_PER_SECOND + nanos
    # A missing occurred_at reads as 0 seconds, outside the window, so it fails this test too.
    if not (0 <= nanos < NANOS_PER_SECOND and MIN_TIME_NS <= at < MAX_TIME_NS):
        _reject_time(msg, nanos)
    payload: Payload
    # HasField is cheaper than WhichOneof, and nine in ten events are activity.
    if msg.HasField("activity"):
        frames = msg.activity.frames
        payload = _ACTIVITIES[frames] if frames < _CACHED_ACTIVITIES else _new_activity(frames)
        texts_have_nul = False
    elif (which := msg.WhichOneof("kind")) == "connected":
        ident = msg.connected.identity
        source_ip = ident.source_ip
        user_agent = ident.user_agent
        node_id = msg.node_id
        if len(node_id) > MAX_ID_LENGTH:
            raise InvalidEvent(id_problem("node_id", node_id, check_nul=False))
        if msg.node_incarnation > _MAX_INCARNATION:
            raise InvalidEvent("node_incarnation does not fit a signed 64-bit integer")
        connected = msg.connected
        principal = connected.principal
        if len(principal) > MAX_ID_LENGTH:
            raise InvalidEvent(id_problem("connected.principal", principal, check_nul=False))
        labels: Labels = ()
        if connected.labels:
            labels = normalized(connected.labels.items())
            problem = labels_problem("connected.labels", labels)
            if problem:
                raise InvalidEvent(problem)
        payload = Connected(source_ip, user_agent, node_id, msg.node_incarnation, principal, labels)
        texts_have_nul = (
            "\x00" in source_ip or "\x00" in user_agent or "\x00" in node_id or "\x00" in principal
        )
    elif which in _NODE_KINDS:
        raise InvalidEvent(f"{which} carries a connection_id (a node event must not)")
    elif which == "disconnected":
        disconnected = msg.disconnected
        status_code = disconnected.status_code
        reason = disconnected.reason
        # The read model must be able to store what decode() accepts (PostgreSQL text cannot
        # hold NUL; an INTEGER column holds any 16-bit close code): otherwise one event stalls
        # a partition.
        if status_code > 0xFFFF:
            raise InvalidEvent("disconnected.status_code is not a 16-bit WebSocket close code")
        payload = Disconnected(status_code, reason, disconnected.cause)
        texts_have_nul = "\x00" in reason
    else:
        raise InvalidEvent("event kind is missing or unknown")
    if texts_have_nul or "\x00" in event_id or "\x00" in connection_id or "\x00" in gateway_id:
        raise InvalidEvent("a text field contains a NUL character")
    return (event_id, connection_id, gateway_id, at, payload)


_parse = pb.ConnectionEvent.FromString

_NODE_KINDS: Final[dict[str | None, type[NodePayload]]] = {
    "node_started": NodeStarted,
    "node_heartbeat": NodeHeartbeat,
    "node_fenced": NodeFenced,
}

# Incarnations are stored in signed 64-bit columns.
_MAX_INCARNATION: Final = 2**63 - 1


def _decode_node_event(msg: pb.ConnectionEvent, key: bytes | None) -> EventTuple:
    """A node's own event: no connection, keyed by node_id. Its tuple's connection_id is ""."""
    which = msg.WhichOneof("kind")
    if which not in _NODE_KINDS:
        raise InvalidEvent("connection_id is required")
    event_id, gateway_id, node_id = msg.event_id, msg.gateway_id, msg.node_id
    for name, v in (("event_id", event_id), ("gateway_id", gateway_id), ("node_id", node_id)):
        problem = id_problem(name, v)
        if problem is not None:
            raise InvalidEvent(problem)
    if key is not None and key != node_id.encode():
        raise InvalidEvent("record key does not equal node_id")
    incarnation = msg.node_incarnation
    if not 0 < incarnation <= _MAX_INCARNATION:
        raise InvalidEvent("node_incarnation is missing or does not fit a signed 64-bit integer")
    ts = msg.occurred_at
    at = ts.seconds * NANOS_PER_SECOND + ts.nanos
    if not (0 <= ts.nanos < NANOS_PER_SECOND and MIN_TIME_NS <= at < MAX_TIME_NS):
        _reject_time(msg, ts.nanos)
    payload: NodePayload = _NODE_KINDS[which](node_id, incarnation)
    return (event_id, "", gateway_id, at, payload)


def decode_record_tuple(value: bytes | None, key: bytes | None) -> EventTuple:
    """decode_tuple() of a record of the events topic, whose key must be its connection_id. A
    keyless record may sit on any partition, out of order with the connection's other events
    and outside the projector's partition fence: the projector dead-letters it, so every replay
    (verify, as-of, rebuild) must leave it out alike."""
    if key is None:
        raise InvalidEvent("record has no key (the key must be connection_id, or node_id)")
    return decode_tuple(value, key)


def decode_record(value: bytes | None, key: bytes | None) -> Event:
    """decode() of a record of the events topic (see decode_record_tuple)."""
    return _new_event(*decode_record_tuple(value, key))


def _reject_ids(*ids: str) -> NoReturn:
    for name, v in zip(("event_id", "connection_id", "gateway_id"), ids, strict=True):
        # NUL is checked with the record's other text fields, after the kind.
        problem = id_problem(name, v, check_nul=False)
        if problem is not None:
            raise InvalidEvent(problem)
    raise AssertionError("_reject_ids called with valid ids")


def _reject_time(msg: pb.ConnectionEvent, nanos: int) -> NoReturn:
    if not msg.HasField("occurred_at"):
        raise InvalidEvent("occurred_at is missing")
    if not 0 <= nanos < NANOS_PER_SECOND:
        raise InvalidEvent("occurred_at.nanos is out of range")
    raise InvalidEvent("occurred_at is outside 2000-01-01..2100-01-01")


# Building a frozen dataclass runs its generated __init__, one object.__setattr__ call per field;
# setting the slots through their descriptors does the same work at a third of the cost, which
# matters at hundreds of thousands of events per second. The unpacking fails at import if a
# field is added or removed; tests/unit/test_events_codec.py checks the result equals the
# ordinary constructor's.
_new_object = object.__new__
_set_event_id, _set_connection_id, _set_gateway_id, _set_occurred_at_ns, _set_payload = (
    getattr(Event, f.name).__set__ for f in fields(Event)
)
(_set_frames,) = (getattr(Activity, f.name).__set__ for f in fields(Activity))


def _new_event(
    event_id: str, connection_id: str, gateway_id: str, occurred_at_ns: int, payload: Payload
) -> Event:
    """Event(event_id, connection_id, gateway_id, occurred_at_ns, payload), faster."""
    event = _new_object(Event)
    _set_event_id(event, event_id)
    _set_connection_id(event, connection_id)
    _set_gateway_id(event, gateway_id)
    _set_occurred_at_ns(event, occurred_at_ns)
    _set_payload(event, payload)
    return event


def _new_activity(frames: int) -> Activity:
    """Activity(frames), faster."""
    activity = _new_object(Activity)
    _set_frames(activity, frames)
    return activity


# Payloads are immutable, so events may share them: most Activity events count a few frames.
_CACHED_ACTIVITIES: Final = 1024
_ACTIVITIES: Final = tuple(_new_activity(n) for n in range(_CACHED_ACTIVITIES))
