"""The spool's files (a durable on-disk spool of encoded events: what the publisher holds while
the broker cannot take them, kept across a crash of the gateway process and replayed in order
later), with blocking I/O; producer/spool.py runs it from an event loop.


Format (docs/producer.md, "Durable spool"), in one directory:

- Segment files `<first sequence number, 20 digits>.seg`, append-only. Each record is
  `<u32 little-endian payload length><u32 CRC-32 of the payload><payload>`. A record's sequence
  number is its segment's first number plus its index in the segment. A new segment starts when
  the last one reaches `segment_bytes`.
- `cursor`: `<u64 first unacknowledged sequence number><u32 CRC-32 of those 8 bytes>`, replaced
  atomically (written to a temporary file, fsynced, renamed, directory fsynced) on each ack().
- Opening scans every segment. A record cut short or failing its CRC (the torn tail of an
  append a crash interrupted) ends its segment: the file is truncated there, and the records
  after it in that segment are lost (only a torn last append can produce one). Zero-length
  records are never written, so a tail of zeros (blocks allocated, never written, after a power
  loss) also ends the segment.
- A segment whose records are all acknowledged is deleted; an empty spool has no segment file.
- `lock`: held (flock, exclusive) while the spool is open, so that no two writers share it.

Bounds: the segment files together never exceed `max_bytes` (acknowledged records still in a
segment that also holds unacknowledged ones count until the segment goes); append() refuses a
batch that would pass it (SpoolFullError), whole, before writing anything.

SpoolFiles does blocking file I/O, one operation at a time (a lock): Spool runs each call in a
worker thread (asyncio.to_thread) and buffers appends in memory in between, so the event loop
never waits on the disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Concatenate, Final, ParamSpec, TypeVar

from conntrack.producer.errors import SpoolError, SpoolFullError

log = logging.getLogger(__name__)

_HEADER: Final = struct.Struct("<II")
_CURSOR: Final = struct.Struct("<QI")
HEADER_BYTES: Final = _HEADER.size
# A record longer than this is corruption, not an event (an event is at most a few KiB).
MAX_RECORD_BYTES: Final = 1 << 20
SEGMENT_SUFFIX: Final = ".seg"
CURSOR_NAME: Final = "cursor"
LOCK_NAME: Final = "lock"
DEFAULT_SEGMENT_BYTES: Final = 4 << 20


def record_bytes(payload: bytes) -> int:
    """The space one payload takes in a segment."""
    return HEADER_BYTES + len(payload)


@dataclass(slots=True)
class _Segment:
    first_seq: int
    path: Path
    count: int
    size: int

    @property
    def end_seq(self) -> int:
        return self.first_seq + self.count


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _scan(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(offset after, payload) of each valid record from f's position; stops at the first record
    that is cut short, too long, empty, or fails its CRC."""
    offset = f.tell()
    while True:
        header = f.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES:
            return
        length, crc = _HEADER.unpack(header)
        if not 0 < length <= MAX_RECORD_BYTES:
            return
        payload = f.read(length)
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        offset += HEADER_BYTES + length
        yield offset, payload


def stored_payloads(directory: str | os.PathLike[str]) -> list[bytes]:
    """The payloads in a spool's segment files, in sequence order (acknowledged records still in
    a segment included), read without taking the lock: a look at what a running or killed
    process has written (tests, an operator). An append in progress ends its segment early."""
    payloads: list[bytes] = []
    for path in sorted(Path(directory).glob("*" + SEGMENT_SUFFIX)):
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
            payloads.extend(payload for _, payload in _scan(f))
    return payloads


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(
    method: Callable[Concatenate[SpoolFiles, _P], _R],
) -> Callable[Concatenate[SpoolFiles, _P], _R]:
    """One operation at a time, even when the task that started one in a worker thread was
    cancelled (asyncio.to_thread cannot stop the thread) and another is started meanwhile."""

    @functools.wraps(method)
    def run(self: SpoolFiles, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)

    return run


class SpoolFiles:
    """The spool's files. open() recovers; then append(), read(), ack(), rewind(), close().

    Sequence numbers: `acked` is the first not acknowledged, `read_seq` the next read() returns,
    `end_seq` the next append() gets; acked <= read_seq <= end_seq."""

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._segments: list[_Segment] = []
        self._acked = 0
        self._read_seq = 0
        # Where read() goes on: the segment index and byte offset of record _read_seq.
        self._read_at: tuple[int, int] = (0, 0)
        self._tail: BinaryIO | None = None
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self.truncated_bytes = 0

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        max_bytes: int,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> SpoolFiles:
        """Open (creating the directory if needed) and recover: truncate torn records, delete
        acknowledged segments, position reads at the first unacknowledged record."""
        if max_bytes < HEADER_BYTES + 1:
            raise ValueError(f"spool_max_bytes must be >= {HEADER_BYTES + 1}")
        if segment_bytes < 1:
            raise ValueError("spool segment_bytes must be >= 1")
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True)
            files = cls(path, max_bytes, segment_bytes)
            files._take_directory()
        except OSError as exc:
            raise SpoolError(f"cannot use spool directory {path}: {exc}") from exc
        try:
            files._recover()
        except OSError as exc:
            files.close()
            raise SpoolError(f"cannot use spool directory {path}: {exc}") from exc
        return files

    def _take_directory(self) -> None:
        """Two writers would interleave their records: an exclusive lock on a file in the
        directory, which the OS releases when the process ends, however it ends."""
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(
                f"spool directory {self.directory} is in use by another publisher (it holds "
                f"{self.directory / LOCK_NAME}); give each one its own directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _recover(self) -> None:
        cursor = self._read_cursor()
        for entry in sorted(self.directory.glob("*" + SEGMENT_SUFFIX)):
            stem = entry.name[: -len(SEGMENT_SUFFIX)]
            if not (stem.isdigit() and len(stem) == 20):
                continue
            with open(entry, "r+b") as f:
                size = count = 0
                for end, _ in _scan(f):
                    size, count = end, count + 1
                actual = f.seek(0, os.SEEK_END)
                if actual != size:
                    log.warning(
                        "spool segment %s: %d byte(s) after its last whole record (a torn "
                        "append); truncated",
                        entry,
                        actual - size,
                    )
                    self.truncated_bytes += actual - size
                    f.truncate(size)
                    f.flush()
                    os.fsync(f.fileno())
            self._segments.append(_Segment(int(stem), entry, count, size))
        first = self._segments[0].first_seq if self._segments else 0
        if cursor is None:
            cursor = first
        end = self._segments[-1].end_seq if self._segments else cursor
        self._acked = min(max(cursor, first), max(end, cursor))
        self._read_seq = self._acked
        self._drop_acked_segments()
        self._read_at = self._locate(self._acked)

    def _read_cursor(self) -> int | None:
        path = self.directory / CURSOR_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) == _CURSOR.size:
            seq, crc = _CURSOR.unpack(data)
            if zlib.crc32(data[:8]) == crc:
                return int(seq)
        # Replaying from the oldest segment repeats events, which their ids make harmless.
        log.warning("spool cursor %s is damaged; replaying from the oldest segment", path)
        return None

    def _write_cursor(self) -> None:
        data = struct.pack("<Q", self._acked)
        tmp = self.directory / (CURSOR_NAME + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_CURSOR.pack(self._acked, zlib.crc32(data)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / CURSOR_NAME)
        _fsync_dir(self.directory)

    def _locate(self, seq: int) -> tuple[int, int]:
        """Segment index and byte offset of record seq (or of the end)."""
        for index, segment in enumerate(self._segments):
            if seq < segment.end_seq:
                offset = 0
                with open(segment.path, "rb") as f:
                    for _ in range(seq - segment.first_seq):
                        offset = next(_scan(f))[0]
                return index, offset
        # At the end: the end of the last segment, where its next append goes.
        return (len(self._segments) - 1, self._segments[-1].size) if self._segments else (0, 0)

    def _drop_acked_segments(self) -> None:
        while self._segments and self._segments[0].end_seq <= self._acked:
            segment = self._segments.pop(0)
            if self._tail is not None and not self._segments:
                self._tail.close()
                self._tail = None
            segment.path.unlink(missing_ok=True)
            index, offset = self._read_at
            # Reads were at or past its end (read_seq >= acked): they go on in the next one.
            self._read_at = (index - 1, offset) if index > 0 else (0, 0)

    # -- what the spool holds ------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes the segment files take (what max_bytes bounds)."""
        return sum(s.size for s in self._segments)

    @property
    def acked(self) -> int:
        return self._acked

    @property
    def read_seq(self) -> int:
        return self._read_seq

    @property
    def end_seq(self) -> int:
        return self._segments[-1].end_seq if self._segments else self._acked

    @property
    def pending(self) -> int:
        """Records not acknowledged yet."""
        return self.end_seq - self._acked

    # -- operations ----------------------------------------------------------------------------

    @_locked
    def append(self, payloads: Sequence[bytes]) -> int:
        """Write these records after the others and fsync them; the first one's sequence number.
        Refuses the whole batch (SpoolFullError) if it would pass max_bytes."""
        need = sum(record_bytes(p) for p in payloads)
        if any(not 0 < len(p) <= MAX_RECORD_BYTES for p in payloads):
            raise ValueError(f"a spool record is 1..{MAX_RECORD_BYTES} bytes")
        if self.size_bytes + need > self.max_bytes:
            raise SpoolFullError(
                f"spool {self.directory} is full: {self.size_bytes} + {need} bytes would pass "
                f"its bound of {self.max_bytes} bytes"
            )
        first = self.end_seq
        for payload in payloads:
            tail = self._tail_for_append()
            tail.write(_HEADER.pack(len(payload), zlib.crc32(payload)))
            tail.write(payload)
            segment = self._segments[-1]
            segment.count += 1
            segment.size += record_bytes(payload)
            if segment.size >= self.segment_bytes:
                self._sync_tail()  # rolled over: this segment is complete
        self._sync_tail()
        return first

    def _tail_for_append(self) -> BinaryIO:
        if (
            self._tail is not None
            and self._segments
            and self._segments[-1].size < self.segment_bytes
        ):
            return self._tail
        if self._tail is not None:
            self._tail.close()
            self._tail = None
        if self._segments and self._segments[-1].size < self.segment_bytes:
            segment = self._segments[-1]
            self._tail = open(segment.path, "ab")  # noqa: SIM115 - kept open between calls
            return self._tail
        first = self.end_seq
        path = self.directory / _segment_name(first)
        self._tail = open(path, "ab")  # noqa: SIM115 - kept open between calls
        self._segments.append(_Segment(first, path, 0, 0))
        _fsync_dir(self.directory)
        return self._tail

    def _sync_tail(self) -> None:
        if self._tail is not None:
            self._tail.flush()
            os.fsync(self._tail.fileno())

    @_locked
    def read(self, max_records: int) -> list[tuple[int, bytes]]:
        """Up to max_records records from read_seq on, in order, as (sequence number, payload);
        read_seq moves past them."""
        got: list[tuple[int, bytes]] = []
        index, offset = self._read_at
        while len(got) < max_records and index < len(self._segments):
            segment = self._segments[index]
            if self._read_seq >= segment.end_seq:
                if index + 1 == len(self._segments):
                    break  # at the end of the last segment, where its next append goes
                index, offset = index + 1, 0
                continue
            # A segment truncated at recovery leaves a gap in the numbers before the next one.
            self._read_seq = max(self._read_seq, segment.first_seq)
            with open(segment.path, "rb") as f:
                f.seek(offset)
                for end, payload in _scan(f):
                    offset = end
                    got.append((self._read_seq, payload))
                    self._read_seq += 1
                    if len(got) >= max_records or self._read_seq >= segment.end_seq:
                        break
            if self._read_seq < segment.end_seq and len(got) < max_records:
                raise SpoolError(f"spool segment {segment.path} changed while in use")
        self._read_at = (index, offset)
        return got

    @_locked
    def ack(self, through_seq: int) -> None:
        """Records up to and including through_seq are delivered: persist the cursor, delete
        segments that hold nothing else."""
        new = through_seq + 1
        if new <= self._acked:
            return
        if new > self._read_seq:
            raise ValueError(f"cannot acknowledge record {through_seq}: it was not read")
        self._acked = new
        self._write_cursor()
        self._drop_acked_segments()

    @_locked
    def rewind(self) -> None:
        """The next read() starts again at the first unacknowledged record."""
        if self._read_seq != self._acked:
            self._read_seq = self._acked
            self._read_at = self._locate(self._acked)

    @_locked
    def close(self) -> None:
        try:
            if self._tail is not None:
                self._sync_tail()
                self._tail.close()
                self._tail = None
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the lock
                self._lock_fd = None
