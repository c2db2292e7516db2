"""The one check every event goes through before the publisher hands it in: the fields the
caller gives, with messages naming them, then exactly what the projector will do (encode, then
decode), so nothing it would dead-letter is ever sent."""

from __future__ import annotations

from typing import Final

from conntrack.core.events import (
    MAX_TIME_NS,
    MIN_TIME_NS,
    NODE_PAYLOADS,
    Activity,
    Connected,
    Disconnected,
    Event,
    InvalidEvent,
    decode,
    encode,
    record_key,
)
from conntrack.core.ids import id_problem
from conntrack.core.labels import labels_problem, principal_problem
from conntrack.producer.node import MAX_INCARNATION

_UINT64_MAX: Final = 2**64 - 1
_MAX_STATUS_CODE: Final = 0xFFFF


def check_id(name: str, value: str) -> None:
    problem = id_problem(name, value)
    if problem is not None:
        raise InvalidEvent(problem)


def check_time(at_ns: int) -> None:
    if not MIN_TIME_NS <= at_ns < MAX_TIME_NS:
        raise InvalidEvent(f"time {at_ns} ns is outside 2000-01-01..2100-01-01")


def check_frames(frames: int) -> None:
    if not 0 <= frames <= _UINT64_MAX:
        raise InvalidEvent(f"frames {frames} is outside 0..2**64-1")


def checked_value(event: Event) -> bytes:
    """The event's encoding, once it passed every check (InvalidEvent otherwise)."""
    payload = event.payload
    node_event = isinstance(payload, NODE_PAYLOADS)
    if isinstance(payload, NODE_PAYLOADS):
        check_id("node_id", payload.node_id)
        if not 0 < payload.incarnation <= MAX_INCARNATION:
            raise InvalidEvent(f"incarnation {payload.incarnation} is outside 1..2**63-1")
        if event.connection_id:
            raise InvalidEvent("a node event must not carry a connection_id")
    else:
        check_id("connection_id", event.connection_id)
    check_time(event.occurred_at_ns)
    if isinstance(payload, Connected):
        problem = principal_problem("principal", payload.principal) or labels_problem(
            "labels", payload.labels
        )
        if problem:
            raise InvalidEvent(problem)
    elif isinstance(payload, Activity):
        check_frames(payload.frames)
    elif isinstance(payload, Disconnected):
        if not 0 <= payload.status_code <= _MAX_STATUS_CODE:
            raise InvalidEvent(
                f"status_code {payload.status_code} is outside 0..65535 (WebSocket close codes)"
            )
        if not 0 <= payload.cause < 2**31:
            raise InvalidEvent(f"cause {payload.cause} is outside 0..2**31-1 (a protobuf enum)")
    try:
        value = encode(event)
        key = record_key(event) if node_event else event.connection_id.encode()
    except (ValueError, TypeError) as exc:
        raise InvalidEvent(f"cannot encode event: {exc}") from None
    decode(value, key)
    return value
