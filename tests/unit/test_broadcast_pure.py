"""Broadcast's pure parts: the broadcast command and its outcome through the codec (round trip,
refusals, records of writers that know no broadcast), the grouping of connection ids into
per-node chunks, and the node's write loop's tally."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conntrack.api.application.broadcast import _ID_OVERHEAD, MAX_IDS_BYTES, Chunker, NodeChunk
from conntrack.core.commands import (
    MAX_BROADCAST_IDS,
    MAX_SEND_BYTES,
    BroadcastFrame,
    CloseSockets,
    Command,
    DataType,
    InvalidCommand,
    Outcome,
    OutcomeStatus,
    decode_command,
    decode_outcome,
    encode_command,
    encode_outcome,
)
from conntrack.core.protogen.conntrack.commands.v1 import commands_pb2 as pb
from conntrack.producer.broadcast import SocketsTally, each_socket, operation_of

IDS = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=255
)
NS = st.integers(0, 2**62)


def _command(frame: BroadcastFrame, **changes: object) -> Command:
    fields: dict[str, object] = {
        "command_id": "b1.1",
        "node_id": "node-a",
        "node_incarnation": 7,
        "connection_id": "",
        "issued_at_ns": 1,
        "expires_at_ns": 2,
        "reply_to": "api-x",
        "action": frame,
    }
    fields.update(changes)
    return Command(**fields)  # type: ignore[arg-type]


@given(
    st.binary(min_size=1, max_size=2048),
    st.sampled_from(DataType),
    st.lists(IDS, min_size=1, max_size=50, unique=True),
    IDS,
    IDS,
    st.integers(1, 2**63),
    NS,
    NS,
)
def test_a_broadcast_command_round_trips(
    data: bytes,
    data_type: DataType,
    ids: list[str],
    node_id: str,
    command_id: str,
    incarnation: int,
    issued: int,
    expires: int,
) -> None:
    command = _command(
        BroadcastFrame(data, data_type, tuple(ids)),
        node_id=node_id,
        command_id=command_id,
        node_incarnation=incarnation,
        issued_at_ns=issued,
        expires_at_ns=expires,
    )
    assert decode_command(encode_command(command), node_id.encode()) == command


@given(
    st.sampled_from(OutcomeStatus),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.text(max_size=100),
)
def test_an_outcome_with_counts_round_trips(
    status: OutcomeStatus, delivered: int, gone: int, detail: str
) -> None:
    outcome = Outcome("b1.1", "node-a", 7, 123, status, detail, delivered, gone)
    assert decode_outcome(encode_outcome(outcome)) == outcome


def test_an_outcome_of_a_writer_without_counts_reads_as_zero() -> None:
    # What a node built before broadcasts existed writes: no delivered or gone fields.
    old = pb.CommandOutcome(
        schema_version=1, command_id="c", node_id="n", status=pb.CommandOutcome.DONE
    )
    outcome = decode_outcome(old.SerializeToString())
    assert (outcome.status, outcome.delivered, outcome.gone) == (OutcomeStatus.DONE, 0, 0)


def test_a_reader_that_knows_no_broadcast_refuses_it_as_invalid() -> None:
    # What an older node has of a broadcast command: field 12 is unknown to it, so no action
    # and no connection_id. Its decoder refuses the record (skipped, logged, no outcome): the
    # API's broadcast is then incomplete, never executed wrongly.
    stripped = pb.Command.FromString(
        encode_command(_command(BroadcastFrame(b"x", DataType.TEXT, ("a", "b"))))
    )
    stripped.ClearField("broadcast")
    with pytest.raises(InvalidCommand, match="connection_id is required"):
        decode_command(stripped.SerializeToString())
    stripped.connection_id = "a"
    with pytest.raises(InvalidCommand, match="action is missing or unknown"):
        decode_command(stripped.SerializeToString())


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (BroadcastFrame(b"x", DataType.TEXT, ()), "1 to 1000 ids"),
        (
            BroadcastFrame(b"x", DataType.TEXT, tuple(str(i) for i in range(1001))),
            "1 to 1000 ids",
        ),
        (BroadcastFrame(b"x", DataType.TEXT, ("a", "a")), "an id twice"),
        (BroadcastFrame(b"x", DataType.TEXT, ("a", "")), "empty, too long or NUL"),
        (BroadcastFrame(b"x", DataType.TEXT, ("a\x00",)), "empty, too long or NUL"),
        (BroadcastFrame(b"x", DataType.TEXT, ("a" * 256,)), "empty, too long or NUL"),
        (BroadcastFrame(b"x" * (MAX_SEND_BYTES + 1), DataType.BINARY, ("a",)), "longer than"),
        (BroadcastFrame(b"x", 0, ("a",)), "neither BINARY nor TEXT"),  # type: ignore[arg-type]
    ],
)
def test_invalid_broadcast_commands_are_refused(frame: BroadcastFrame, why: str) -> None:
    with pytest.raises(InvalidCommand, match=why):
        decode_command(encode_command(_command(frame)))


def test_a_broadcast_needs_no_connection_id_but_send_still_does() -> None:
    frame = BroadcastFrame(b"x", DataType.TEXT, ("a",))
    assert decode_command(encode_command(_command(frame))).connection_id == ""
    send = pb.Command(
        schema_version=1, command_id="c", node_id="n", reply_to="r", send=pb.Send(data=b"x")
    )
    send.send.type = pb.Send.TEXT
    with pytest.raises(InvalidCommand, match="connection_id is required"):
        decode_command(send.SerializeToString())


def test_the_largest_broadcast_command_fits_kafkas_default_message_size() -> None:
    chunker = Chunker()
    chunks = [
        c
        for i in range(MAX_BROADCAST_IDS * 2)
        if (c := chunker.add("n" * 255, 1, f"{i:04d}" + "é" * 251)) is not None
    ]
    chunks.extend(chunker.flush())
    biggest = max(
        len(
            encode_command(
                _command(
                    BroadcastFrame(b"x" * MAX_SEND_BYTES, DataType.BINARY, c.connection_ids),
                    node_id="n" * 255,
                    command_id="c" * 255,
                    reply_to="r" * 255,
                )
            )
        )
        for c in chunks
    )
    assert biggest < 700_000  # Kafka's default max.message.bytes is 1,048,588


ENTRIES = st.lists(
    st.tuples(st.sampled_from(["n1", "n2", "n3"]), st.integers(1, 2), IDS),
    max_size=300,
    unique_by=lambda e: e[2],
)


@given(ENTRIES, st.integers(1, 20), st.integers(1, 3000))
def test_chunks_hold_each_id_once_grouped_by_node_within_limits(
    entries: list[tuple[str, int, str]], max_ids: int, max_bytes: int
) -> None:
    chunker = Chunker(max_ids=max_ids, max_bytes=max_bytes)
    chunks: list[NodeChunk] = []
    for node, incarnation, cid in entries:
        full = chunker.add(node, incarnation, cid)
        if full is not None:
            chunks.append(full)
    chunks.extend(chunker.flush())
    assert list(chunker.flush()) == []
    # Each id once, in the chunk of its node incarnation, in the order given.
    placed = {cid: (c.node_id, c.node_incarnation) for c in chunks for cid in c.connection_ids}
    assert Counter(cid for c in chunks for cid in c.connection_ids) == Counter(
        e[2] for e in entries
    )
    assert placed == {cid: (node, inc) for node, inc, cid in entries}
    for chunk in chunks:
        assert 1 <= len(chunk.connection_ids) <= max_ids
        size = sum(len(cid.encode()) + _ID_OVERHEAD for cid in chunk.connection_ids)
        # Over the byte limit only as a single id that alone exceeds it.
        assert size <= max_bytes or len(chunk.connection_ids) == 1
    for key in {(n, i) for n, i, _ in entries}:
        in_order = [cid for n, i, cid in entries if (n, i) == key]
        chunked = [
            cid
            for c in chunks
            if (c.node_id, c.node_incarnation) == key
            for cid in c.connection_ids
        ]
        assert chunked == in_order


def test_chunks_fill_to_the_id_limit_before_the_byte_limit_for_short_ids() -> None:
    chunker = Chunker()
    full = [chunker.add("n", 1, f"{i:032x}") for i in range(2500)]
    sizes = [len(c.connection_ids) for c in full if c is not None]
    assert sizes == [MAX_BROADCAST_IDS, MAX_BROADCAST_IDS]
    assert [len(c.connection_ids) for c in chunker.flush()] == [500]
    assert MAX_IDS_BYTES > MAX_BROADCAST_IDS * (32 + _ID_OVERHEAD)


class _Sockets:
    """A node's sockets as the write loop sees them: held, gone, or failing."""

    def __init__(self, held: set[str], failing: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.held = held
        self.failing = failing
        self.written: list[tuple[str, bytes, DataType]] = []
        self.closed: list[tuple[str, int, str]] = []
        self.concurrent = self.most_concurrent = 0

    async def send(self, connection_id: str, data: bytes, data_type: DataType, /) -> bool:
        self.concurrent += 1
        self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            await asyncio.sleep(0)
            if connection_id in self.failing:
                raise ConnectionResetError("peer went away")
            if connection_id not in self.held:
                return False
            self.written.append((connection_id, data, data_type))
            return True
        finally:
            self.concurrent -= 1

    async def disconnect(self, connection_id: str, status_code: int, reason: str, /) -> bool:
        await asyncio.sleep(0)
        if connection_id not in self.held:
            return False
        self.held.discard(connection_id)
        self.closed.append((connection_id, status_code, reason))
        return True


async def test_the_write_loop_counts_written_gone_and_failed() -> None:
    ids = tuple(f"c{i}" for i in range(200))
    sockets = _Sockets(held=set(ids[:150]), failing={"c3", "c4"})
    tally = SocketsTally()
    frame = BroadcastFrame(b"hi", DataType.TEXT, ids)
    await each_socket(operation_of(sockets, frame), ids, tally, concurrency=8)
    assert (tally.done, len(tally.gone_ids), len(tally.failed_ids)) == (148, 50, 2)
    assert sorted(tally.gone_ids) == sorted(ids[150:])
    assert sorted(tally.failed_ids) == ["c3", "c4"]
    assert tally.unreached(ids) == ()
    assert tally.error == "ConnectionResetError: peer went away"
    assert sorted(w[0] for w in sockets.written) == sorted(set(ids[:150]) - {"c3", "c4"})
    assert {(w[1], w[2]) for w in sockets.written} == {(b"hi", DataType.TEXT)}
    assert sockets.most_concurrent == 8


async def test_a_disconnect_of_many_closes_the_held_and_names_the_gone() -> None:
    ids = tuple(f"c{i}" for i in range(10))
    sockets = _Sockets(held=set(ids[:6]))
    tally = SocketsTally()
    action = CloseSockets(4000, "bye", ids)
    await each_socket(operation_of(sockets, action), ids, tally)
    assert tally.done == 6
    assert sorted(sockets.closed) == [(c, 4000, "bye") for c in sorted(ids[:6])]
    assert sorted(tally.gone_ids) == sorted(ids[6:])


async def test_ids_not_reached_before_a_cancel_are_unreached() -> None:
    ids = tuple(f"c{i}" for i in range(100))

    class Slow(_Sockets):
        async def send(self, connection_id: str, data: bytes, data_type: DataType, /) -> bool:
            await asyncio.sleep(0.01 if connection_id < "c5" else 10)
            return True

    tally = SocketsTally()
    frame = BroadcastFrame(b"x", DataType.BINARY, ids)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await each_socket(operation_of(Slow(set(ids)), frame), ids, tally, concurrency=4)
    assert tally.done >= 1
    assert len(tally.unreached(ids)) == 100 - tally.done
