"""The durable spool for an event loop: SpoolFiles (producer/spool_files.py: the format, the
bound, recovery) run in a worker thread, appends buffered in memory in between, so the event
loop never waits on the disk."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from conntrack.producer.errors import SpoolError
from conntrack.producer.spool_files import (
    DEFAULT_SEGMENT_BYTES,
    HEADER_BYTES,
    SpoolFiles,
    record_bytes,
)

log = logging.getLogger(__name__)


class Spool:
    """SpoolFiles for an event loop: put() buffers in memory (no I/O, never waits) and one
    writer task appends the buffer in a worker thread, one append (one fsync) per batch of
    whatever arrived meanwhile. Reads, acks and rewinds run in the worker thread too, one at a
    time. The bound counts the buffer: put() refuses what would not fit on disk.

    A process crash loses the records put but not yet written (those that arrived during the
    previous append); an OS crash or power loss also loses the batch being appended until its
    fsync returns. durable() waits for both."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_bytes: int,
        *,
        segment_bytes: int | None = None,
    ) -> None:
        if max_bytes < HEADER_BYTES + 1:
            raise ValueError(f"spool_max_bytes must be >= {HEADER_BYTES + 1}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # Small enough that acknowledged records do not hold much of the bound for long.
        self.segment_bytes = segment_bytes or max(1, min(DEFAULT_SEGMENT_BYTES, max_bytes // 8))
        self._files: SpoolFiles | None = None
        self._io = asyncio.Lock()
        self._buffer: list[bytes] = []
        self._buffered_bytes = 0
        self._writing_bytes = 0
        self._size_bytes = 0
        self._end_seq = 0
        self._acked = 0
        self._read_seq = 0
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._written = asyncio.Event()
        self._put_total = 0
        self._done_total = 0
        self.lost = 0
        """Records put but not written because the disk refused them (logged)."""

    @property
    def is_open(self) -> bool:
        return self._files is not None

    async def open(self) -> None:
        """Open and recover the files (SpoolError if the directory cannot be used)."""
        if self._files is not None:
            return
        self._files = await asyncio.to_thread(
            SpoolFiles.open, self.directory, self.max_bytes, self.segment_bytes
        )
        self._mirror()
        self._writer = asyncio.create_task(self._write_buffered())

    def _mirror(self) -> None:
        files = self._files
        assert files is not None
        self._size_bytes = files.size_bytes
        self._end_seq = files.end_seq
        self._acked = files.acked
        self._read_seq = files.read_seq

    @property
    def pending(self) -> int:
        """Records put and not acknowledged (buffered ones included)."""
        return self._end_seq - self._acked + self._put_total - self._done_total

    @property
    def unread(self) -> int:
        """Records written and not read yet (read() would return them)."""
        return self._end_seq - self._read_seq

    @property
    def size_bytes(self) -> int:
        """Bytes on disk plus bytes buffered or being written."""
        return self._size_bytes + self._writing_bytes + self._buffered_bytes

    def put(self, payload: bytes) -> bool:
        """Buffer one record for the writer; False (nothing kept) if it would pass the bound."""
        if self._files is None:
            raise SpoolError("the spool is not open")
        need = record_bytes(payload)
        if self.size_bytes + need > self.max_bytes:
            return False
        self._buffer.append(payload)
        self._buffered_bytes += need
        self._put_total += 1
        self._wake.set()
        return True

    async def _write_buffered(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._buffer:
                continue
            batch, self._buffer = self._buffer, []
            self._writing_bytes, self._buffered_bytes = self._buffered_bytes, 0
            try:
                async with self._io:
                    assert self._files is not None
                    await asyncio.to_thread(self._files.append, batch)
                    self._mirror()
            except Exception as exc:
                # A disk that fails a write (full, gone read-only) loses this batch: say so, with
                # the count, and go on (counted in `lost`).
                self.lost += len(batch)
                log.error(
                    "spool %s: %d record(s) could not be written and are lost: %r",
                    self.directory,
                    len(batch),
                    exc,
                )
            self._done_total += len(batch)
            self._writing_bytes = 0
            self._written.set()
            self._written = asyncio.Event()

    async def durable(self) -> None:
        """Wait until everything put so far is written and fsynced (or failed to be)."""
        target = self._put_total
        while self._done_total < target:
            if self._writer is None or self._writer.done():
                raise SpoolError("the spool's writer is not running")
            await self._written.wait()

    async def read(self, max_records: int) -> list[tuple[int, bytes]]:
        async with self._io:
            assert self._files is not None
            got = await asyncio.to_thread(self._files.read, max_records)
            self._mirror()
            return got

    async def ack(self, through_seq: int) -> None:
        async with self._io:
            assert self._files is not None
            await asyncio.to_thread(self._files.ack, through_seq)
            self._mirror()

    async def rewind(self) -> None:
        async with self._io:
            assert self._files is not None
            await asyncio.to_thread(self._files.rewind)
            self._mirror()

    async def close(self) -> None:
        """Write what is buffered, close the files. Idempotent."""
        if self._files is None:
            return
        await self.durable()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        async with self._io:
            await asyncio.to_thread(self._files.close)
        self._files = None
