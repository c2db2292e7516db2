"""The codec: encode() writes what decode() accepts; decode() rejects anything else with
InvalidEvent and never with another exception (fuzzed with arbitrary bytes)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connection_tracker.events import (
    MAX_ID_LENGTH,
    MAX_TIME_NS,
    MIN_TIME_NS,
    Activity,
    Connected,
    Disconnected,
    Event,
    InvalidEvent,
    Payload,
    decode,
    encode,
)
from connection_tracker.protogen.conntrack.events.v1 import events_pb2 as pb
from connection_tracker.timeutil import to_timestamp

# Any Unicode except surrogates (not encodable) and NUL (not storable in PostgreSQL text).
_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
text = st.text(_chars)
ids = st.text(_chars, min_size=1, max_size=MAX_ID_LENGTH)
payloads: st.SearchStrategy[Payload] = st.one_of(
    st.builds(Connected, text, text),
    st.builds(Activity, st.integers(0, 2**64 - 1)),
    st.builds(Disconnected, st.integers(0, 0xFFFF), text),
)
valid_events = st.builds(Event, ids, ids, ids, st.integers(MIN_TIME_NS, MAX_TIME_NS - 1), payloads)


@given(valid_events)
def test_round_trip(event: Event) -> None:
    assert decode(encode(event), event.connection_id.encode()) == event
    assert decode(encode(event)) == event


@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_rejected_only_with_invalid_event(data: bytes) -> None:
    try:
        event = decode(data, b"k")
    except InvalidEvent as exc:
        reason = str(exc)
        assert reason
    else:  # bytes that happen to be a valid event must really be one
        assert event.connection_id == "k"


@given(valid_events, st.data())
def test_corrupted_encodings_are_rejected_only_with_invalid_event(
    event: Event, data: st.DataObject
) -> None:
    raw = bytearray(encode(event))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(InvalidEvent):
        decode(bytes(raw[:cut]), event.connection_id.encode())


def message(**fields: object) -> pb.ConnectionEvent:
    msg = pb.ConnectionEvent(
        schema_version=1,
        event_id="e1",
        connection_id="c1",
        gateway_id="gw",
        occurred_at=to_timestamp(1_764_300_000_123_456_789),
    )
    msg.activity.frames = 1
    for name, value in fields.items():
        if value is None:
            msg.ClearField(name)
        elif name == "occurred_at":
            msg.occurred_at.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(msg, name, value)
    return msg


def test_a_valid_message_decodes_with_exact_nanoseconds() -> None:
    event = decode(message().SerializeToString(), b"c1")
    assert event.occurred_at_ns == 1_764_300_000_123_456_789
    assert event.kind == "activity"


@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        (None, b"c1", "no value"),
        (b"\xff\xff\xff", b"c1", "not a ConnectionEvent"),
        (message(event_id="").SerializeToString(), b"c1", "event_id is missing"),
        (message(connection_id="").SerializeToString(), None, "connection_id is missing"),
        (message(gateway_id="").SerializeToString(), b"c1", "gateway_id is missing"),
        (message(event_id="x" * 256).SerializeToString(), b"c1", "longer than"),
        (message().SerializeToString(), b"other", "key does not equal"),
        (message(occurred_at=None).SerializeToString(), b"c1", "occurred_at is missing"),
        (
            message(occurred_at=to_timestamp(MIN_TIME_NS - 1)).SerializeToString(),
            b"c1",
            "outside",
        ),
        (message(occurred_at=to_timestamp(MAX_TIME_NS)).SerializeToString(), b"c1", "outside"),
        (message(schema_version=99).SerializeToString(), b"c1", "schema_version"),
        (message(gateway_id="g\x00w").SerializeToString(), b"c1", "NUL"),
    ],
)
def test_invalid_records_are_rejected_with_a_reason(
    value: bytes | None, key: bytes | None, reason: str
) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        decode(value, key)


def test_unknown_kind_is_rejected() -> None:
    msg = message()
    msg.ClearField("activity")
    # Field 13 is a kind this reader does not know (a newer producer's), length-delimited.
    raw = msg.SerializeToString() + bytes([13 << 3 | 2, 0])
    with pytest.raises(InvalidEvent, match="kind is missing or unknown"):
        decode(raw, b"c1")


def test_out_of_range_nanos_are_rejected() -> None:
    msg = message()
    msg.occurred_at.nanos = 1_000_000_000
    with pytest.raises(InvalidEvent, match="nanos"):
        decode(msg.SerializeToString(), b"c1")


def test_status_code_beyond_16_bits_is_rejected() -> None:
    msg = message()
    msg.disconnected.status_code = 70000
    with pytest.raises(InvalidEvent, match="status_code"):
        decode(msg.SerializeToString(), b"c1")
