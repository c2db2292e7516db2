"""One batch pipeline for every writer of the read model (the projector, a rebuild's shadow):
records are decoded into events and partition advances (Batch), and one batch is written while
the next is prepared (WriteBehind)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from conntrack.core.events import EventTuple, InvalidEvent, decode_record_tuple
from conntrack.core.fold import ConnectionState, NodeState, fold_nodes, fold_tuples
from conntrack.core.history import SIGHTING_GAP_NS, fences_of, sightings_of
from conntrack.core.history_store import NodeHistory
from conntrack.core.process import BATCH_GEN0_THRESHOLD

# Records a writer takes from the log and decodes between two yields to the event loop (about
# 2 ms of work). The batch being written needs the loop for each of its round trips (about 8 per
# batch: checkout, fence, staging, COPY, upsert, commit), so each of them waits for the slice in
# hand to end: with 1000 records a slice, a batch's write took longer than preparing the next
# one, and the process idled a quarter of the time (rebuild and projector catch-up of 3M events:
# 35 s at 1000, 22-24 s at 250, 27 s at 100, where the slices' own overhead shows).
YIELD_EVERY = 250

# Objects the cyclic garbage collector tracks that a batch keeps alive per event until it is
# written (the record, its event tuple, its connection's folded state, a payload), times the
# batches a writer holds at once (the one being written and the next, prepared behind it), with
# room to spare.
_TRACKED_PER_EVENT = 10
# A young generation this large is collected rarely even if a process does make cycles; above
# it the garbage they leave could hold hundreds of megabytes before a collection.
_MAX_GEN0_THRESHOLD = 1_000_000


def gen0_threshold(batch_events: int) -> int:
    """The young-generation threshold (conntrack.core.process.tune_gc) for a process that
    writes batches of up to batch_events events (the projector, a rebuild).

    A batch's objects all live until it is written, and the collector's young-generation count
    is allocations minus deallocations: with a threshold below what the batches in hand hold,
    every batch sets off young collections that traverse (and promote) all of its surviving
    objects, then older collections that traverse them again. Above it, a young collection
    comes only once garbage that reference counting cannot free (cycles, rare here) adds up to
    the threshold. Measured when the default was chosen (git history of BENCHMARKS.md, 1d): with
    the default batch of 20000, 50000 cost the in-process projector about 2 µs of collection per
    event out of 10, 200000 or more about 0."""
    return max(BATCH_GEN0_THRESHOLD, min(_MAX_GEN0_THRESHOLD, _TRACKED_PER_EVENT * batch_events))


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

    def node_history(self) -> NodeHistory:
        """What the batch adds to the nodes' history (core/history.py)."""
        return NodeHistory(
            SIGHTING_GAP_NS, sightings_of(self.events, SIGHTING_GAP_NS), fences_of(self.events)
        )


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
