"""Rebuild the live read model from the beginning of history without downtime.

A rebuild folds the whole log into a shadow generation (the read model's tables named
`*_rebuild`, in the same database) through the very ProjectionStore code the projector uses, so
the shadow is at every commit exactly the fold of the log up to its own stored positions. An
interrupted rebuild resumes from those positions.

When the shadow has caught up with the log end, one transaction switches generations:

1. it locks the live tables against writers (PostgreSQL: LOCK .. IN EXCLUSIVE MODE, which readers
   pass; SQLite: BEGIN IMMEDIATE, the single write lock; WAL readers are never blocked), so the
   live projector's positions stand still;
2. folds into the shadow whatever the live projector applied beyond the shadow (a handful of
   records: the switch is only attempted when the gap is small), so that for every partition
   the shadow's position is >= the live one;
3. renames live -> `*_retired` and shadow -> live (indexes and constraints too, so names never
   collide on the next rebuild), and commits.

Readers (the API) name the live tables, so they see either the old generation or the complete
new one, never a half-built one. The live projector's next batch finds its partition positions
moved on (FencedError), re-reads them from the new table and carries on from there; where the
positions are equal it simply carries on: the rows are the fold up to those positions either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conntrack.audit.generations import (
    SHADOW,
    RebuildError,
    drop_retired,
    prepare_shadow,
    quote,
    switch_ddl,
)
from conntrack.audit.log import LogReader
from conntrack.core.batch import YIELD_EVERY, Batch, WriteBehind
from conntrack.core.fold import ConnectionState, NodeState
from conntrack.core.history_store import NodeHistory
from conntrack.core.retry import Backoff, one_line
from conntrack.core.schema import LIVE
from conntrack.core.statistics import analyze
from conntrack.core.store import FencedError, ProjectionStore

log = logging.getLogger(__name__)

# PostgreSQL SQLSTATEs after which a switch attempt is simply tried again: the lock wait timed
# out (a long reader such as `conntrack-audit verify` holds the table) or the deadlock detector
# chose the switch (a retention prune upgrading its lock at the same moment).
_RETRYABLE_SQLSTATES = frozenset({"55P03", "40P01"})


@dataclass
class Progress:
    """Events folded into the shadow against events known to be due, with rate and ETA."""

    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)
    resumed_from: int = 0  # events the shadow already held when this run started

    def rate(self, now: float | None = None) -> float:
        elapsed = (time.monotonic() if now is None else now) - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta_seconds(self, now: float | None = None) -> float | None:
        rate = self.rate(now)
        if rate <= 0:
            return None
        return max(0, self.total - self.done) / rate

    def line(self, now: float | None = None) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta_seconds(now)
        eta_text = "?" if eta is None else _duration(eta)
        return (
            f"rebuild: {self.done:,}/{self.total:,} events ({pct:.1f}%), "
            f"{self.rate(now):,.0f} events/s, ETA {eta_text}"
        )


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@dataclass(frozen=True)
class RebuildResult:
    events: int  # valid events this run folded
    invalid: int  # records this run skipped (the projector dead-letters them)
    resumed: bool  # the shadow already existed: this run continued an interrupted rebuild
    positions: dict[int, int]  # the new live generation's positions at the switch
    switch_attempts: int
    switch_seconds: float  # time the last (successful) switch transaction held its locks
    folded_in_switch: int  # records the live projection had beyond the shadow at the switch


class Rebuild:
    """Fold the whole log into the shadow generation, then switch it live (run())."""

    def __init__(
        self,
        engine: AsyncEngine,
        reader: LogReader,
        *,
        batch_events: int = 20_000,
        max_events_per_second: float | None = None,
        max_switch_gap: int = 2_000,
        lock_timeout_seconds: float = 2.0,
        max_switch_attempts: int = 50,
        switch: bool = True,
        on_batch: Callable[[Progress], None] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        """max_switch_gap: switch only when the live projection is at most this many records
        beyond the shadow (they are folded while the live writers wait). switch=False stops
        once caught up, leaving the shadow for a later run. on_batch runs after every
        committed shadow batch."""
        if batch_events < 1:
            raise ValueError("batch_events must be >= 1")
        if max_events_per_second is not None and max_events_per_second <= 0:
            raise ValueError("max_events_per_second must be > 0")
        self._engine = engine
        self._reader = reader
        self._topic = reader.topic
        self._shadow = ProjectionStore(engine, SHADOW)
        self._live = ProjectionStore(engine, LIVE)
        self._batch_events = batch_events
        self._rate_limit = max_events_per_second
        self._max_gap = max_switch_gap
        self._lock_timeout = lock_timeout_seconds
        self._max_attempts = max_switch_attempts
        self._switch = switch
        self._on_batch = on_batch
        # Between switch attempts that met a lock or a deadlock.
        self._backoff = backoff or Backoff(max_s=lock_timeout_seconds)
        self.progress = Progress()
        self._positions: dict[int, int] = {}
        self._events = 0
        self._invalid = 0
        # Records the live projection had applied beyond the shadow, folded by the switch.
        self.folded_in_switch = 0
        self._resumed = False

    async def run(self) -> RebuildResult:
        """Fold everything into the shadow, then switch it live (unless switch=False)."""
        await self.start()
        attempts = 0
        delays = self._backoff.delays()
        analyzed = False
        while True:
            await self.catch_up()
            if not self._switch:
                return self._result(attempts, 0.0)
            if not analyzed:
                # Statistics of the new generation before it goes live, outside the switch's
                # locks (core/statistics.py says why the service's queries need them).
                await analyze(self._engine, SHADOW.all)
                analyzed = True
            if self._gap(await self._live.all_positions()) > self._max_gap:
                continue  # the live projection ran ahead: another round before locking
            attempts += 1
            try:
                held = await self.try_switch()
            except (DBAPIError, OperationalError) as exc:
                if not _retryable(exc) or attempts >= self._max_attempts:
                    raise
                delay = next(delays)
                log.warning(
                    "event=switch_retry attempt=%d delay_s=%.1f error=%r",
                    attempts,
                    delay,
                    one_line(exc),
                )
                await asyncio.sleep(delay)
                continue
            if held is not None:
                return self._result(attempts, held)
            if attempts >= self._max_attempts:
                raise RebuildError(
                    f"the live projection stayed more than {self._max_gap} records ahead of "
                    f"the shadow over {attempts} switch attempts; the shadow is kept, run "
                    "again (or raise --max-switch-gap)"
                )

    async def start(self) -> None:
        """Create the shadow tables (or take up the ones an interrupted rebuild left) and read
        their positions."""
        self._resumed = await prepare_shadow(self._engine)
        parts = await self._reader.partitions()
        self._positions = await self._shadow.positions(self._topic, parts)
        start = await self._reader.beginning(parts)
        self.progress.resumed_from = sum(max(0, self._positions[p] - start[p]) for p in parts)
        if self._resumed:
            log.info("event=rebuild_resumed positions=%s", _fmt(self._positions))

    def _result(self, attempts: int, held: float) -> RebuildResult:
        return RebuildResult(
            self._events,
            self._invalid,
            self._resumed,
            dict(self._positions),
            attempts,
            held,
            self.folded_in_switch,
        )

    def _gap(self, live: Mapping[tuple[str, int], int]) -> int:
        others = sorted({t for t, _ in live if t != self._topic})
        if others:
            raise RebuildError(
                f"the live read model also holds positions of topics {others}; a rebuild "
                f"folds only {self._topic} and would drop them"
            )
        return sum(max(0, o - self._positions.get(p, 0)) for (_, p), o in live.items())

    # Folding into the shadow

    async def catch_up(self) -> None:
        """Fold everything from the shadow's positions to the log end as it is now."""
        parts = await self._reader.partitions()
        new = [p for p in parts if p not in self._positions]
        if new:  # partitions added to the topic since the rebuild began
            self._positions |= await self._shadow.positions(self._topic, new)
        start, end = await self._reader.beginning(parts), await self._reader.end(parts)
        bounds = {p: (max(self._positions[p], start[p]), end[p]) for p in parts}
        self.progress.total = self.progress.done + sum(max(0, e - s) for s, e in bounds.values())
        # Batch N is written while batch N+1 is read, decoded and folded (the database's work
        # overlaps this process's). The shadow has one writer, so N+1 simply starts where N
        # ends; if N fails, the rebuild stops and resumes from the stored positions.
        # Records are read and decoded in slices with a yield to the event loop in between, so
        # the batch in flight gets through its round trips while the next one is assembled.
        writing = WriteBehind()
        planned = dict(self._positions)
        batch = Batch(planned)
        try:
            slice_size = min(YIELD_EVERY, self._batch_events)
            async for records in self._reader.read(bounds, max_records=slice_size):
                batch.add_records(records)
                await asyncio.sleep(0)
                if batch.records < self._batch_events:
                    continue
                planned |= {p: new for p, (_, new) in batch.advances.items()}
                # Folded here, not in the write: the write's round trips are what the next
                # batch's reading waits on, and the fold is this process's own work.
                states, nodes = batch.fold(), batch.fold_nodes()
                await writing.finish()
                writing.start(self._commit(batch, states, nodes))
                batch = Batch(planned)
                await self._throttle()
            await writing.finish()
            if batch.records:
                await self._commit(batch, batch.fold(), batch.fold_nodes())
        finally:
            await writing.cancel()
        # A compacted or transactional range can end in offsets that hold no record: the read
        # has consumed them all the same.
        tail = {
            p: (self._positions[p], e) for p, (_, e) in bounds.items() if self._positions[p] < e
        }
        if tail:
            await self._write(tail, {}, None)

    async def _apply(self, records: list[Any], conn: AsyncConnection | None) -> None:
        batch = Batch(self._positions)
        batch.add_records(records)
        await self._commit(batch, batch.fold(), batch.fold_nodes(), conn)

    async def _commit(
        self,
        batch: Batch,
        states: Mapping[str, ConnectionState],
        nodes: Mapping[str, NodeState],
        conn: AsyncConnection | None = None,
    ) -> None:
        # A record that does not decode folds to nothing here (the projector dead-letters it).
        history = batch.node_history()
        await self._write(batch.advances, states, conn, nodes, history)
        self._events += len(batch.events)
        self._invalid += len(batch.rejected)
        self.progress.done += batch.records
        if self._on_batch is not None:
            self._on_batch(self.progress)

    async def _write(
        self,
        advances: dict[int, tuple[int, int]],
        states: Mapping[str, ConnectionState],
        conn: AsyncConnection | None,
        nodes: Mapping[str, NodeState] | None = None,
        history: NodeHistory | None = None,
    ) -> None:
        try:
            if conn is None:
                await self._shadow.apply_batch(
                    self._topic, advances, states, nodes, history=history
                )
            else:
                await self._shadow.apply_batch_in(
                    conn, self._topic, advances, states, nodes, history=history
                )
        except FencedError as exc:
            raise RebuildError(
                f"another rebuild is writing the shadow tables ({exc}); run only one"
            ) from exc
        for p, (_, new) in advances.items():
            self._positions[p] = new

    async def _throttle(self) -> None:
        if self._rate_limit is None:
            return
        due = self.progress.done / self._rate_limit
        ahead = due - (time.monotonic() - self.progress.started)
        if ahead > 0:
            await asyncio.sleep(ahead)

    # The switch

    async def try_switch(self) -> float | None:
        """One switch transaction. Returns how long it held its locks, or None when the live
        projection was too far ahead (rolled back; nothing changed)."""
        await drop_retired(self._engine)  # outside the locks: dropping may take a while
        async with self._engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                # The write lock at once (a deferred transaction would take it only at the
                # first write, after reading positions that may have moved by then).
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
                locked_at = time.monotonic()
            else:
                await conn.execute(
                    text(f"SET LOCAL lock_timeout = {int(self._lock_timeout * 1000)}")
                )
                # EXCLUSIVE stops every writer (projector, retention) but lets readers through;
                # the renames below take ACCESS EXCLUSIVE only for their last moments.
                names = ", ".join(quote(conn, t.name) for t in LIVE.all)
                await conn.execute(text(f"LOCK TABLE {names} IN EXCLUSIVE MODE"))
                locked_at = time.monotonic()
            saved = dict(self._positions)
            try:
                switched = await self._switch_locked(conn, sqlite)
                if switched:
                    await conn.commit()
            except BaseException:
                await conn.rollback()
                self._positions = saved  # what was folded in the switch is rolled back too
                raise
            if not switched:
                await conn.rollback()
                return None
            held = time.monotonic() - locked_at
        log.info(
            "event=rebuild_switched positions=%s locks_held_s=%.3f", _fmt(self._positions), held
        )
        return held

    async def _switch_locked(self, conn: AsyncConnection, sqlite: bool) -> bool:
        offsets = LIVE.projection_offsets
        live = {
            (r.topic, int(r.partition)): int(r.next_offset)
            for r in await conn.execute(select(offsets))
        }
        if self._gap(live) > self._max_gap:
            return False
        behind = {
            p: (self._positions.get(p, 0), o)
            for (_, p), o in live.items()
            if o > self._positions.get(p, 0)
        }
        if behind:
            missing = [p for p in behind if p not in self._positions]
            if missing:
                return False  # a partition the shadow has no row for yet: one more round
            await self._fold_in(conn, behind)
            self.folded_in_switch = sum(new - old for old, new in behind.values())
        shadow = {
            int(r.partition): int(r.next_offset)
            for r in await conn.execute(
                select(SHADOW.projection_offsets).where(
                    SHADOW.projection_offsets.c.topic == self._topic
                )
            )
        }
        short = {p: o for (_, p), o in live.items() if shadow.get(p, -1) < o}
        if short:  # cannot happen after _fold_in; refuse rather than switch to less
            raise RebuildError(f"shadow behind the live projection after folding: {short}")
        for ddl in switch_ddl(conn, sqlite):
            await conn.execute(text(ddl))
        return True

    async def _fold_in(self, conn: AsyncConnection, bounds: dict[int, tuple[int, int]]) -> None:
        async for records in self._reader.read(bounds, max_records=self._batch_events):
            await self._apply(records, conn)
        tail = {
            p: (self._positions[p], e) for p, (_, e) in bounds.items() if self._positions[p] < e
        }
        if tail:
            await self._write(tail, {}, conn)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError) and "locked" in str(exc):
        return True  # SQLite: the write lock stayed busy past busy_timeout
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code in _RETRYABLE_SQLSTATES


def _fmt(positions: Mapping[int, int]) -> str:
    return ",".join(f"{p}:{o}" for p, o in sorted(positions.items()))
