"""The spool's files (producer/spool_files.py): format, recovery, order and bounds, on a real
directory; plus the event-loop wrapper's buffer, bound and durability (producer/spool.py)."""

from __future__ import annotations

import asyncio
import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conntrack.producer.errors import SpoolError, SpoolFullError
from conntrack.producer.spool import Spool
from conntrack.producer.spool_files import (
    CURSOR_NAME,
    HEADER_BYTES,
    SEGMENT_SUFFIX,
    SpoolFiles,
    record_bytes,
    stored_payloads,
)


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*" + SEGMENT_SUFFIX))


def _disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in _segments(directory))


def test_records_come_back_in_order_and_survive_a_reopen(tmp_path: Path) -> None:
    files = SpoolFiles.open(tmp_path, 10_000, segment_bytes=64)
    assert files.append([b"a" * 10, b"b" * 20]) == 0
    assert files.append([b"c"]) == 2
    assert files.read(2) == [(0, b"a" * 10), (1, b"b" * 20)]
    files.ack(0)
    files.close()

    again = SpoolFiles.open(tmp_path, 10_000, segment_bytes=64)
    # Read but not acknowledged is read again: acknowledgement, not reading, is what counts.
    assert again.read(10) == [(1, b"b" * 20), (2, b"c")]
    assert again.pending == 2
    again.ack(2)
    assert again.pending == 0
    assert _segments(tmp_path) == []  # everything acknowledged: no segment is left
    assert again.append([b"d"]) == 3  # numbers go on from the cursor
    again.close()


def test_reading_to_the_end_then_appending_reads_the_new_records(tmp_path: Path) -> None:
    files = SpoolFiles.open(tmp_path, 10_000, segment_bytes=1000)
    files.append([b"a"])
    assert files.read(8) == [(0, b"a")]
    files.append([b"b"])  # into the same, last segment, after where reading stopped
    assert files.read(8) == [(1, b"b")]
    files.close()


def test_segments_roll_and_are_deleted_once_acknowledged(tmp_path: Path) -> None:
    files = SpoolFiles.open(tmp_path, 10_000, segment_bytes=3 * record_bytes(b"x" * 10))
    files.append([b"x" * 10] * 7)
    assert [p.name for p in _segments(tmp_path)] == [
        f"{0:020d}.seg",
        f"{3:020d}.seg",
        f"{6:020d}.seg",
    ]
    got = files.read(4)
    assert [seq for seq, _ in got] == [0, 1, 2, 3]
    files.ack(3)
    assert [p.name for p in _segments(tmp_path)] == [f"{3:020d}.seg", f"{6:020d}.seg"]
    assert files.size_bytes == _disk_bytes(tmp_path)
    assert [seq for seq, _ in files.read(10)] == [4, 5, 6]
    files.close()


def test_a_torn_last_record_is_truncated(tmp_path: Path) -> None:
    files = SpoolFiles.open(tmp_path, 10_000)
    files.append([b"first", b"second"])
    files.close()
    (segment,) = _segments(tmp_path)
    whole = segment.stat().st_size
    with open(segment, "ab") as f:  # a third append, cut short by a crash
        f.write(struct.pack("<II", 100, 0) + b"only part of it")
    again = SpoolFiles.open(tmp_path, 10_000)
    assert again.truncated_bytes == HEADER_BYTES + len(b"only part of it")
    assert segment.stat().st_size == whole
    assert again.read(10) == [(0, b"first"), (1, b"second")]
    assert again.append([b"third"]) == 2
    again.close()


def test_a_record_failing_its_crc_ends_the_segment(tmp_path: Path) -> None:
    files = SpoolFiles.open(tmp_path, 10_000)
    files.append([b"good", b"flipped"])
    files.close()
    (segment,) = _segments(tmp_path)
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF
    segment.write_bytes(bytes(data))
    again = SpoolFiles.open(tmp_path, 10_000)
    assert again.read(10) == [(0, b"good")]
    again.close()


def test_zeros_after_a_power_loss_are_not_records(tmp_path: Path) -> None:
    files = SpoolFiles.open(tmp_path, 10_000)
    files.append([b"kept"])
    files.close()
    (segment,) = _segments(tmp_path)
    with open(segment, "ab") as f:
        f.write(bytes(4096))  # crc32(b"") == 0: a zero header would look valid if allowed
    again = SpoolFiles.open(tmp_path, 10_000)
    assert again.read(10) == [(0, b"kept")]
    assert again.pending == 1
    again.close()


def test_a_damaged_cursor_replays_from_the_oldest_segment(tmp_path: Path) -> None:
    files = SpoolFiles.open(tmp_path, 10_000)
    files.append([b"a", b"b", b"c"])
    files.read(2)
    files.ack(1)
    files.close()
    (tmp_path / CURSOR_NAME).write_bytes(b"garbage")
    again = SpoolFiles.open(tmp_path, 10_000)
    assert [seq for seq, _ in again.read(10)] == [0, 1, 2]  # repeats, never loses
    again.close()


def test_the_bound_refuses_a_whole_batch_before_writing(tmp_path: Path) -> None:
    bound = 3 * record_bytes(b"x" * 10)
    files = SpoolFiles.open(tmp_path, bound, segment_bytes=bound)
    files.append([b"x" * 10, b"x" * 10])
    with pytest.raises(SpoolFullError, match="full"):
        files.append([b"x" * 10, b"x" * 10])
    assert files.pending == 2
    files.append([b"x" * 10])
    assert files.size_bytes == bound == _disk_bytes(tmp_path)
    with pytest.raises(SpoolFullError):
        files.append([b"x"])
    files.read(3)
    files.ack(2)  # acknowledged: the segment goes, and with it the room it took
    files.append([b"x" * 10])
    files.close()


def test_bad_arguments_and_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        SpoolFiles.open(tmp_path, 3)
    files = SpoolFiles.open(tmp_path, 10_000)
    with pytest.raises(ValueError, match="1\\.\\."):
        files.append([b""])
    with pytest.raises(ValueError, match="not read"):
        files.ack(0)
    files.close()
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(SpoolError, match="cannot use spool directory"):
        SpoolFiles.open(blocker / "spool", 10_000)


def test_one_directory_takes_one_writer(tmp_path: Path) -> None:
    files = SpoolFiles.open(tmp_path, 10_000)
    with pytest.raises(SpoolError, match="in use by another publisher"):
        SpoolFiles.open(tmp_path, 10_000)
    files.close()
    SpoolFiles.open(tmp_path, 10_000).close()  # released by close (and by any process exit)


# -- property: any sequence of operations keeps order, acknowledgements and the bound ----------

_payloads = st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), _payloads),
        st.tuples(st.just("read"), st.integers(1, 8)),
        st.tuples(st.just("ack"), st.integers(0, 8)),
        st.tuples(st.just("rewind"), st.none()),
        st.tuples(st.just("reopen"), st.none()),
        st.tuples(st.just("tear"), st.binary(min_size=1, max_size=30)),
    ),
    max_size=40,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_ops, max_bytes=st.integers(60, 600), segment_bytes=st.integers(1, 200))
def test_property_order_acknowledgements_and_bound(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[str, object]],
    max_bytes: int,
    segment_bytes: int,
) -> None:
    directory = tmp_path_factory.mktemp("spool")
    files = SpoolFiles.open(directory, max_bytes, segment_bytes)
    # The model: every record appended and not lost, by sequence number; acked and read marks.
    records: dict[int, bytes] = {}
    end = acked = read = 0
    for op, arg in ops:
        if op == "append":
            assert isinstance(arg, list)
            need = sum(record_bytes(p) for p in arg)
            before = files.size_bytes
            try:
                first = files.append(arg)
            except SpoolFullError:
                assert before + need > max_bytes
                assert files.size_bytes == before
            else:
                assert before + need <= max_bytes
                assert first == end
                for payload in arg:
                    records[end] = payload
                    end += 1
        elif op == "read":
            assert isinstance(arg, int)
            got = files.read(arg)
            expected = [(s, records[s]) for s in range(read, min(end, read + arg))]
            assert got == expected
            read += len(got)
        elif op == "ack":
            assert isinstance(arg, int)
            if read > acked:
                through = acked + arg % (read - acked)
                files.ack(through)
                acked = through + 1
        elif op == "rewind":
            files.rewind()
            read = acked
        elif op == "reopen":
            files.close()
            files = SpoolFiles.open(directory, max_bytes, segment_bytes)
            read = acked
        elif op == "tear":
            assert isinstance(arg, bytes)
            files.close()
            segments = _segments(directory)
            if segments:
                # Garbage after the last whole record: a torn append. Never a valid record:
                # a header whose length promises more than is there.
                with open(segments[-1], "ab") as f:
                    f.write(struct.pack("<II", 1 << 19, zlib.crc32(arg)) + arg)
            files = SpoolFiles.open(directory, max_bytes, segment_bytes)
            read = acked
        assert files.size_bytes == _disk_bytes(directory) <= max_bytes
        assert files.acked == acked
        assert files.pending == end - acked
        assert files.read_seq == read
    files.close()
    # Whatever the history, a reopened spool gives exactly the unacknowledged records, in order.
    final = SpoolFiles.open(directory, max_bytes, segment_bytes)
    assert final.read(10_000) == [(s, records[s]) for s in range(acked, end)]
    final.close()
    assert not any(name.endswith(".tmp") for name in os.listdir(directory))


# -- the event-loop wrapper --------------------------------------------------------------------


async def test_put_buffers_and_durable_writes(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1000)
    await spool.open()
    assert spool.put(b"one")
    assert spool.put(b"two")
    assert spool.pending == 2
    await spool.durable()
    assert spool.unread == 2
    assert _disk_bytes(tmp_path) == record_bytes(b"one") + record_bytes(b"two")
    assert await spool.read(10) == [(0, b"one"), (1, b"two")]
    await spool.ack(1)
    assert spool.pending == 0
    await spool.close()
    await spool.close()  # idempotent


async def test_put_counts_the_buffer_against_the_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 3 * record_bytes(b"x" * 20))
    await spool.open()
    assert all(spool.put(b"x" * 20) for _ in range(3))  # all still buffered
    assert not spool.put(b"x")
    await spool.durable()
    assert not spool.put(b"x")
    assert spool.size_bytes == _disk_bytes(tmp_path)
    await spool.close()
    reopened = Spool(tmp_path, 3 * record_bytes(b"x" * 20))
    await reopened.open()
    assert reopened.pending == 3
    assert not reopened.put(b"x")  # the bound holds across a restart too
    await reopened.close()


async def test_many_puts_share_few_appends(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    await spool.open()
    for i in range(2000):
        assert spool.put(b"%d" % i)
        if i % 100 == 0:
            await asyncio.sleep(0)
    await spool.durable()
    got = await spool.read(5000)
    assert [p for _, p in got] == [b"%d" % i for i in range(2000)]
    await spool.close()


def test_a_closed_spool_refuses_puts(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="not open"):
        Spool(tmp_path, 1000).put(b"x")


def test_stored_payloads_reads_a_spool_held_by_its_writer(tmp_path: Path) -> None:
    """A look from outside while the writer holds the lock: every record in sequence order
    across segments, acknowledged ones still in a segment included; a torn tail ends it."""
    assert stored_payloads(tmp_path / "none") == []
    files = SpoolFiles.open(tmp_path, 10_000, segment_bytes=64)
    try:
        payloads = [bytes([65 + i]) * 30 for i in range(5)]
        files.append(payloads)
        assert len(_segments(tmp_path)) == 3  # 38-byte records, two to a 64-byte segment
        files.read(3)
        files.ack(0)  # its segment still holds record 1: kept
        assert stored_payloads(tmp_path) == payloads
        files.ack(2)  # the first segment goes
        assert stored_payloads(tmp_path) == payloads[2:]
        with _segments(tmp_path)[-1].open("ab") as f:
            f.write(struct.pack("<II", 30, 0) + b"torn")
        assert stored_payloads(tmp_path)[-1] == payloads[-1]
    finally:
        files.close()
