"""Events and records the tests publish: generated workloads and poison."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from conntrack.core.events import (
    HEADERS,
    Activity,
    Connected,
    Disconnected,
    Event,
    encode,
)

T0 = 1_764_300_000_000_000_000


Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers


def make_events(rnd: random.Random, prefix: str, n: int, connections: int) -> list[Event]:
    """n events over `connections` connections, each connection's in a plausible order."""
    out = []
    for i in range(n):
        cid = f"{prefix}-{rnd.randrange(connections)}"
        at = T0 + rnd.randrange(10**12)
        roll = rnd.random()
        payload = (
            Connected(f"10.{rnd.randrange(256)}.0.1", f"ua/{rnd.randrange(3)}")
            if roll < 0.3
            else Disconnected(rnd.choice([1000, 1001]), "bye")
            if roll < 0.4
            else Activity(rnd.randrange(9))
        )
        out.append(Event(f"{prefix}-e{i}", cid, f"gw-{rnd.randrange(3)}", at, payload))
    return out


def as_records(events: Sequence[Event]) -> list[Record]:
    return [(e.connection_id.encode(), encode(e), list(HEADERS)) for e in events]


def _poison_message(**changes: Any) -> bytes:
    from conntrack.core.protogen.conntrack.events.v1 import events_pb2 as pb
    from conntrack.core.timeutil import to_timestamp

    msg = pb.ConnectionEvent(
        schema_version=1,
        event_id="poison-e",
        connection_id="p",
        gateway_id="gw",
        occurred_at=to_timestamp(T0),
    )
    msg.activity.frames = 1
    for name, value in changes.items():
        if name == "occurred_at":
            msg.occurred_at.CopyFrom(value)
        elif name == "kind":
            msg.ClearField("activity")
            # An unknown field 16, length-delimited: its tag (16 << 3 | 2) is a two-byte varint.
            return msg.SerializeToString() + bytes([0x82, 0x01, 0])
        else:
            setattr(msg, name, value)
    return msg.SerializeToString()


def poison_records() -> list[tuple[Record, str]]:
    """(record, words of the error it must be dead-lettered with)."""
    from conntrack.core.timeutil import to_timestamp

    trace = [("trace-id", b"poison")]
    valid = encode(Event("valid-e", "p", "gw", T0, Activity(1)))
    return [
        ((b"p", b"\x00\xffnot protobuf at all\xff", trace), "not a ConnectionEvent"),
        ((b"p", _poison_message(event_id=""), trace), "event_id is required"),
        ((b"p", _poison_message(kind=None), trace), "kind is missing or unknown"),
        ((b"p", _poison_message(occurred_at=to_timestamp(0)), trace), "outside"),
        ((b"someone-else", valid, trace), "key does not equal"),
        ((None, valid, trace), "record has no key"),
        ((b"p", None, trace), "no value"),
        ((b"p", _poison_message(gateway_id="g\x00w"), trace), "NUL"),
    ]
