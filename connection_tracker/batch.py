"""One batch pipeline for every writer of the read model (the projector, a rebuild's shadow):
records are decoded into events and partition advances (Batch), and one batch is written while
the next is prepared (WriteBehind)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from connection_tracker.events import EventTuple, InvalidEvent, decode_record_tuple
from connection_tracker.fold import ConnectionState, NodeState, fold_nodes, fold_tuples


class Batch:
    """The decoded records of one read-model transaction, added run by run from the positions
    where its partitions start. A record that does not decode is kept with its error (the
    projector dead-letters it; a rebuild folds it to nothing) and its offset is passed all the
    same."""

    def __init__(self, starts: Mapping[int, int]) -> None:
        self._starts = dict(starts)
        self.events: list[EventTuple] = []
        self.rejected: list[tuple[Any, str]] = []  # (record, why it was rejected)
        self.advances: dict[int, tuple[int, int]] = {}  # partition -> (start, new position)
        self.taken: dict[int, int] = {}  # partition -> records added
        self.records = 0

    def add(self, partition: int, records: Sequence[Any], end: int | None = None) -> None:
        """Records of one partition, in offset order, continuing where its last run ended;
        `end` is where they leave the partition (default: past the last of them)."""
        events, rejected = self.events, self.rejected
        for record in records:
            try:
                events.append(decode_record_tuple(record.value, record.key))
            except InvalidEvent as exc:
                rejected.append((record, str(exc)))
        start = self.advances.get(partition, (self._starts[partition], 0))[0]
        if end is None:
            end = records[-1].offset + 1
        self.advances[partition] = (start, end)
        self.taken[partition] = self.taken.get(partition, 0) + len(records)
        self.records += len(records)

    def add_records(self, records: Sequence[Any]) -> None:
        """Records of any partitions, each partition's in offset order (a log read)."""
        by_partition: dict[int, list[Any]] = {}
        for record in records:
            by_partition.setdefault(record.partition, []).append(record)
        for partition, of_partition in by_partition.items():
            self.add(partition, of_partition)

    def fold(self) -> dict[str, ConnectionState]:
        return fold_tuples(self.events)

    def fold_nodes(self) -> dict[str, NodeState]:
        return fold_nodes(self.events)


class WriteBehind:
    """At most one batch write in flight, so the database's work on batch N overlaps the
    process's own work on batch N+1: start() a write, prepare the next batch, finish() the one
    in flight (its exception, if any, comes out there), start() the next."""

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None

    @property
    def busy(self) -> bool:
        return self._task is not None

    def start(self, write: Coroutine[Any, Any, Any]) -> None:
        assert self._task is None, "finish() the write in flight first"
        self._task = asyncio.create_task(write)

    async def finish(self) -> Any:
        """Wait for the write in flight (None if there is none) and return its result."""
        task, self._task = self._task, None
        return None if task is None else await task

    async def cancel(self) -> None:
        """Give up the write in flight (its transaction rolls back)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
