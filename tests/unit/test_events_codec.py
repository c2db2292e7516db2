"""The codec: encode() writes what decode() accepts; decode() rejects anything else with
InvalidEvent and never with another exception (fuzzed with arbitrary bytes)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from conntrack.core.events import (
    MAX_TIME_NS,
    MIN_TIME_NS,
    Activity,
    Connected,
    Disconnected,
    Event,
    InvalidEvent,
    NodeFenced,
    NodeHeartbeat,
    NodeStarted,
    Payload,
    decode,
    decode_record,
    decode_record_tuple,
    decode_tuple,
    encode,
    record_key,
    upcast,
)
from conntrack.core.ids import MAX_ID_LENGTH
from conntrack.core.labels import (
    MAX_LABEL_VALUE_LENGTH,
    MAX_LABELS,
    label_key_problem,
    label_value_problem,
)
from conntrack.core.protogen.conntrack.events.v1 import events_pb2 as pb
from conntrack.core.timeutil import NANOS_PER_SECOND, to_timestamp

# Any Unicode except surrogates (not encodable) and NUL (not storable in PostgreSQL text).
_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
text = st.text(_chars)
ids = st.text(_chars, min_size=1, max_size=MAX_ID_LENGTH)
payloads: st.SearchStrategy[Payload] = st.one_of(
    st.builds(Connected, text, text),
    st.builds(Connected, text, text, ids, st.integers(1, 2**63 - 1)),
    st.builds(
        Connected,
        text,
        text,
        st.just(""),
        st.just(0),
        st.text(_chars, max_size=MAX_ID_LENGTH),
        st.dictionaries(
            st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}", fullmatch=True),
            st.text(
                st.characters(exclude_categories=["Cs", "Cc"], exclude_characters=",()=!"),
                max_size=MAX_LABEL_VALUE_LENGTH,
            ).map(str.strip),
            max_size=MAX_LABELS,
        ).map(lambda d: tuple(sorted(d.items()))),
    ),
    st.builds(Activity, st.integers(0, 2**64 - 1)),
    st.builds(Disconnected, st.integers(0, 0xFFFF), text, st.integers(0, 2**31 - 1)),
)
node_payloads: st.SearchStrategy[Payload] = st.one_of(
    st.builds(NodeStarted, ids, st.integers(1, 2**63 - 1)),
    st.builds(NodeHeartbeat, ids, st.integers(1, 2**63 - 1)),
    st.builds(NodeFenced, ids, st.integers(1, 2**63 - 1)),
)
_times = st.integers(MIN_TIME_NS, MAX_TIME_NS - 1)
valid_events = st.one_of(
    st.builds(Event, ids, ids, ids, _times, payloads),
    st.builds(Event, ids, st.just(""), ids, _times, node_payloads),
)


@given(valid_events)
def test_round_trip(event: Event) -> None:
    assert decode(encode(event), record_key(event)) == event
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


def test_a_record_of_the_events_topic_needs_its_key() -> None:
    event = Event("e", "c", "gw", MIN_TIME_NS + 1, Activity(1))
    assert decode_record(encode(event), b"c") == event
    assert decode_record_tuple(encode(event), b"c") == decode_tuple(encode(event), b"c")
    assert decode(encode(event)) == event  # a message on its own needs no key
    for decoder in (decode_record, decode_record_tuple):
        with pytest.raises(InvalidEvent, match="record has no key"):
            decoder(encode(event), None)
        with pytest.raises(InvalidEvent, match="key does not equal"):
            decoder(encode(event), b"other")


def test_a_valid_message_decodes_with_exact_nanoseconds() -> None:
    event = decode(message().SerializeToString(), b"c1")
    assert event.occurred_at_ns == 1_764_300_000_123_456_789
    assert event.kind == "activity"


@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        (None, b"c1", "no value"),
        (b"\xff\xff\xff", b"c1", "not a ConnectionEvent"),
        (message(event_id="").SerializeToString(), b"c1", "event_id is required"),
        (message(connection_id="").SerializeToString(), None, "connection_id is required"),
        (message(gateway_id="").SerializeToString(), b"c1", "gateway_id is required"),
        (message(event_id="x" * 256).SerializeToString(), b"c1", "must be at most 255 characters"),
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
    # Field 16 is a kind this reader does not know (a newer producer's), length-delimited.
    raw = msg.SerializeToString() + bytes([0x82, 0x01, 0])  # (16 << 3 | 2) as a varint, empty
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


# The fast decoder against the plain one. decode() reads each field once and tests the common
# case in one go (see core/events.py); reference_decode is the straightforward
# version it replaced, kept here as the oracle: both must accept the same records as the same
# events and reject the others with the same reason.


def reference_decode(value: bytes | None, key: bytes | None = None) -> Event:
    if value is None:
        raise InvalidEvent("record has no value")
    msg = pb.ConnectionEvent()
    try:
        msg.ParseFromString(value)
    except (DecodeError, RecursionError) as exc:
        raise InvalidEvent(f"not a ConnectionEvent protobuf: {exc}") from None
    msg = upcast(msg)
    if not msg.connection_id and msg.node_id:
        return reference_decode_node(msg, key)
    for name in ("event_id", "connection_id", "gateway_id"):
        v = getattr(msg, name)
        if not v:
            raise InvalidEvent(f"{name} is required")
        if len(v) > MAX_ID_LENGTH:
            raise InvalidEvent(f"{name} must be at most {MAX_ID_LENGTH} characters, got {len(v)}")
    if key is not None and key != msg.connection_id.encode():
        raise InvalidEvent("record key does not equal connection_id")
    if not msg.HasField("occurred_at"):
        raise InvalidEvent("occurred_at is missing")
    if not 0 <= msg.occurred_at.nanos < NANOS_PER_SECOND:
        raise InvalidEvent("occurred_at.nanos is out of range")
    at = msg.occurred_at.seconds * NANOS_PER_SECOND + msg.occurred_at.nanos
    if not MIN_TIME_NS <= at < MAX_TIME_NS:
        raise InvalidEvent("occurred_at is outside 2000-01-01..2100-01-01")
    which = msg.WhichOneof("kind")
    payload: Payload
    if which == "connected":
        ident = msg.connected.identity
        if len(msg.node_id) > MAX_ID_LENGTH:
            raise InvalidEvent(
                f"node_id must be at most {MAX_ID_LENGTH} characters, got {len(msg.node_id)}"
            )
        if msg.node_incarnation > 2**63 - 1:
            raise InvalidEvent("node_incarnation does not fit a signed 64-bit integer")
        principal = msg.connected.principal
        if len(principal) > MAX_ID_LENGTH:
            raise InvalidEvent(
                f"connected.principal must be at most {MAX_ID_LENGTH} characters, "
                f"got {len(principal)}"
            )
        labels = dict(msg.connected.labels)
        if len(labels) > MAX_LABELS:
            raise InvalidEvent(
                f"connected.labels must hold at most {MAX_LABELS} labels, got {len(labels)}"
            )
        for k, v in sorted(labels.items()):
            problem = label_key_problem("connected.labels", k) or label_value_problem(
                "connected.labels", k, v
            )
            if problem:
                raise InvalidEvent(problem)
        payload = Connected(
            source_ip=ident.source_ip,
            user_agent=ident.user_agent,
            node_id=msg.node_id,
            node_incarnation=msg.node_incarnation,
            principal=principal,
            labels=tuple(sorted(labels.items())),
        )
    elif which == "activity":
        payload = Activity(frames=msg.activity.frames)
    elif which == "disconnected":
        payload = Disconnected(
            status_code=msg.disconnected.status_code,
            reason=msg.disconnected.reason,
            cause=msg.disconnected.cause,
        )
    elif which in _NODE_KINDS:
        raise InvalidEvent(f"{which} carries a connection_id (a node event must not)")
    else:
        raise InvalidEvent("event kind is missing or unknown")
    if isinstance(payload, Disconnected) and payload.status_code > 0xFFFF:
        raise InvalidEvent("disconnected.status_code is not a 16-bit WebSocket close code")
    texts = [msg.event_id, msg.connection_id, msg.gateway_id]
    if isinstance(payload, Connected):
        texts += [payload.source_ip, payload.user_agent, payload.node_id, payload.principal]
    elif isinstance(payload, Disconnected):
        texts.append(payload.reason)
    if any("\x00" in t for t in texts):
        raise InvalidEvent("a text field contains a NUL character")
    return Event(msg.event_id, msg.connection_id, msg.gateway_id, at, payload)


def reference_decode_node(msg: pb.ConnectionEvent, key: bytes | None) -> Event:
    which = msg.WhichOneof("kind")
    if which not in _NODE_KINDS:
        raise InvalidEvent("connection_id is required")
    for name in ("event_id", "gateway_id", "node_id"):
        v = getattr(msg, name)
        if not v:
            raise InvalidEvent(f"{name} is required")
        if len(v) > MAX_ID_LENGTH:
            raise InvalidEvent(f"{name} must be at most {MAX_ID_LENGTH} characters, got {len(v)}")
        if "\x00" in v:
            raise InvalidEvent(f"{name} must not contain NUL")
    if key is not None and key != msg.node_id.encode():
        raise InvalidEvent("record key does not equal node_id")
    if not 0 < msg.node_incarnation <= 2**63 - 1:
        raise InvalidEvent("node_incarnation is missing or does not fit a signed 64-bit integer")
    if not msg.HasField("occurred_at"):
        raise InvalidEvent("occurred_at is missing")
    if not 0 <= msg.occurred_at.nanos < NANOS_PER_SECOND:
        raise InvalidEvent("occurred_at.nanos is out of range")
    at = msg.occurred_at.seconds * NANOS_PER_SECOND + msg.occurred_at.nanos
    if not MIN_TIME_NS <= at < MAX_TIME_NS:
        raise InvalidEvent("occurred_at is outside 2000-01-01..2100-01-01")
    kind = _NODE_KINDS[which]
    return Event(msg.event_id, "", msg.gateway_id, at, kind(msg.node_id, msg.node_incarnation))


_NODE_KINDS: dict[str | None, type[NodeStarted | NodeHeartbeat | NodeFenced]] = {
    "node_started": NodeStarted,
    "node_heartbeat": NodeHeartbeat,
    "node_fenced": NodeFenced,
}


def test_a_node_event_is_keyed_by_its_node_and_carries_no_connection() -> None:
    event = Event("e", "", "gw", MIN_TIME_NS, NodeHeartbeat("node-1", 7))
    assert record_key(event) == b"node-1"
    assert decode_record(encode(event), b"node-1") == event
    with pytest.raises(InvalidEvent, match="record key does not equal node_id"):
        decode_record(encode(event), b"other")
    msg = pb.ConnectionEvent.FromString(encode(event))
    msg.node_incarnation = 0
    with pytest.raises(InvalidEvent, match="node_incarnation is missing"):
        decode(msg.SerializeToString())
    msg.node_incarnation = 7
    msg.connection_id = "c1"
    with pytest.raises(InvalidEvent, match="carries a connection_id"):
        decode(msg.SerializeToString(), b"c1")


Outcome = tuple[str, object]


def outcome(decoder: Callable[[bytes | None, bytes | None], object], *record: Any) -> Outcome:
    try:
        return ("accepted", decoder(*record))
    except InvalidEvent as exc:
        return ("rejected", str(exc))


def assert_decoders_agree(value: bytes | None, key: bytes | None) -> None:
    expected = outcome(reference_decode, value, key)
    assert outcome(decode, value, key) == expected
    as_tuple = outcome(decode_tuple, value, key)
    if expected[0] == "accepted":
        assert as_tuple[0] == "accepted"
        assert Event(*as_tuple[1]) == expected[1]  # type: ignore[misc]
    else:
        assert as_tuple == expected


# Records near every boundary decode() checks: a valid message of a random kind with up to
# three defects from this list (so each check is hit alone and behind the others), plus a few
# valid extremes. The first failing check must be named the same by both decoders.
_FIRST_SECOND, _END_SECOND = MIN_TIME_NS // NANOS_PER_SECOND, MAX_TIME_NS // NANOS_PER_SECOND
_Defect = Callable[[pb.ConnectionEvent], object]
_DEFECTS: dict[str, _Defect] = {
    "schema 0": lambda m: setattr(m, "schema_version", 0),
    "schema 2": lambda m: setattr(m, "schema_version", 2),
    "no time": lambda m: m.ClearField("occurred_at"),
    "time 0": lambda m: m.occurred_at.CopyFrom(to_timestamp(0)),
    "nanos 1e9": lambda m: setattr(m.occurred_at, "nanos", NANOS_PER_SECOND),
    "nanos -1": lambda m: setattr(m.occurred_at, "nanos", -1),
    "seconds -1": lambda m: setattr(m.occurred_at, "seconds", -1),
    "before 2000": lambda m: m.occurred_at.CopyFrom(to_timestamp(MIN_TIME_NS - 1)),
    "first instant": lambda m: m.occurred_at.CopyFrom(to_timestamp(MIN_TIME_NS)),
    "last instant": lambda m: m.occurred_at.CopyFrom(to_timestamp(MAX_TIME_NS - 1)),
    "2100": lambda m: setattr(m.occurred_at, "seconds", _END_SECOND),
    "no kind": lambda m: m.ClearField(m.WhichOneof("kind") or "activity"),
    "ip NUL": lambda m: setattr(m.connected.identity, "source_ip", "1\x00"),
    "ua NUL": lambda m: setattr(m.connected.identity, "user_agent", "u\x00a"),
    "empty identity": lambda m: m.connected.identity.Clear(),
    "reason NUL": lambda m: setattr(m.disconnected, "reason", "\x00"),
    "code 0xFFFF": lambda m: setattr(m.disconnected, "status_code", 0xFFFF),
    "code 0x10000": lambda m: setattr(m.disconnected, "status_code", 0x10000),
    "code 2**32-1": lambda m: setattr(m.disconnected, "status_code", 2**32 - 1),
    "frames 2**64-1": lambda m: setattr(m.activity, "frames", 2**64 - 1),
    "frames 1024": lambda m: setattr(m.activity, "frames", 1024),
    "principal": lambda m: setattr(m.connected, "principal", "alice@example.com"),
    "principal longest": lambda m: setattr(m.connected, "principal", "p" * MAX_ID_LENGTH),
    "principal too long": lambda m: setattr(m.connected, "principal", "p" * (MAX_ID_LENGTH + 1)),
    "principal NUL": lambda m: setattr(m.connected, "principal", "a\x00"),
    "labels": lambda m: m.connected.labels.update({"tenant": "t1", "device": "ios"}),
    "labels most": lambda m: m.connected.labels.update({f"k{i}": "v" for i in range(MAX_LABELS)}),
    "labels too many": lambda m: m.connected.labels.update(
        {f"k{i}": "v" for i in range(MAX_LABELS + 1)}
    ),
    "label key empty": lambda m: m.connected.labels.update({"": "v"}),
    "label key bad": lambda m: m.connected.labels.update({"-x": "v"}),
    "label key too long": lambda m: m.connected.labels.update({"k" * 64: "v"}),
    "label value too long": lambda m: m.connected.labels.update({"k": "v" * 256}),
    "label value NUL": lambda m: m.connected.labels.update({"k": "\x00"}),
}


def _set_field(m: pb.ConnectionEvent, field: str, value: str) -> None:
    setattr(m, field, value)


for _field in ("event_id", "connection_id", "gateway_id"):
    for _name, _bad in [
        ("empty", ""),
        ("longest", "x" * MAX_ID_LENGTH),
        ("too long", "x" * (MAX_ID_LENGTH + 1)),
        ("NUL", "a\x00b"),
        ("non-ASCII", "é"),
    ]:
        _DEFECTS[f"{_field} {_name}"] = functools.partial(_set_field, field=_field, value=_bad)


def _with_kind(msg: pb.ConnectionEvent, kind: str) -> pb.ConnectionEvent:
    if kind == "connected":
        msg.connected.identity.source_ip = "10.0.0.1"
        msg.connected.identity.user_agent = "ua"
    elif kind == "disconnected":
        msg.disconnected.status_code = 1000
        msg.disconnected.reason = "bye"
    return msg


@pytest.mark.parametrize("kind", ["activity", "connected", "disconnected"])
@pytest.mark.parametrize("defect", sorted(_DEFECTS))
def test_decode_agrees_with_the_plain_decoder_on_each_defect(kind: str, defect: str) -> None:
    msg = _with_kind(message(), kind)
    _DEFECTS[defect](msg)
    for key in (b"c1", None, b"", b"other"):
        assert_decoders_agree(msg.SerializeToString(), key)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    msg = message()
    kind = draw(st.sampled_from(["activity", "connected", "disconnected"]))
    if kind == "connected":
        msg.connected.identity.source_ip = draw(st.sampled_from(["10.0.0.1", "", "ü"]))
        msg.connected.identity.user_agent = draw(st.sampled_from(["ua", ""]))
    elif kind == "disconnected":
        msg.disconnected.status_code = draw(st.sampled_from([0, 1000]))
        msg.disconnected.reason = draw(st.sampled_from(["", "bye"]))
    for name in draw(st.lists(st.sampled_from(sorted(_DEFECTS)), max_size=3)):
        _DEFECTS[name](msg)
    raw = msg.SerializeToString()
    if msg.WhichOneof("kind") is None and draw(st.booleans()):
        raw += bytes([15 << 3 | 2, 0])  # a kind from a newer schema
    return raw


@given(messages(), st.sampled_from([b"c1", None, b"", b"other", "é".encode(), b"x" * 256]))
def test_decode_agrees_with_the_plain_decoder_at_every_boundary(
    raw: bytes, key: bytes | None
) -> None:
    assert_decoders_agree(raw, key)


@given(valid_events, st.booleans())
def test_decode_agrees_with_the_plain_decoder_on_valid_events(event: Event, keyed: bool) -> None:
    assert_decoders_agree(encode(event), event.connection_id.encode() if keyed else None)


@given(st.binary(max_size=256), st.none() | st.binary(max_size=4))
def test_decode_agrees_with_the_plain_decoder_on_arbitrary_bytes(
    data: bytes, key: bytes | None
) -> None:
    assert_decoders_agree(data, key)


def test_decode_agrees_with_the_plain_decoder_on_no_value() -> None:
    assert_decoders_agree(None, b"c1")


@given(valid_events, st.data())
def test_decode_agrees_with_the_plain_decoder_on_corrupted_encodings(
    event: Event, data: st.DataObject
) -> None:
    raw = bytearray(encode(event))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    assert_decoders_agree(bytes(raw[: data.draw(st.integers(0, len(raw)))]), None)


@given(valid_events)
def test_decoded_events_equal_constructed_ones_in_every_way(event: Event) -> None:
    decoded = decode(encode(event))
    assert decoded == event
    assert hash(decoded) == hash(event)
    assert dataclasses.astuple(decoded) == dataclasses.astuple(event)
    assert decoded.kind == event.kind
    assert event.kind.replace("_", "") == type(event.payload).__name__.lower()
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoded.event_id = "x"  # type: ignore[misc]


def test_kind_names_a_payload_of_any_type() -> None:
    class Resumed(Activity):
        pass

    assert Event("e", "c", "g", MIN_TIME_NS, Resumed(1)).kind == "resumed"
    assert [Event("e", "c", "g", MIN_TIME_NS, p).kind for p in (Connected("", ""), Activity())] == [
        "connected",
        "activity",
    ]
