"""The projector process: consume the events topic in batches and apply them to the store.

Positions live in the read-model database (ProjectionStore), not in Kafka: on partition
assignment the consumer seeks to the stored positions ("Storing Offsets Outside Kafka" in the
aiokafka docs). Kafka group offsets are committed after each database commit only so that
standard lag tools see progress; they are never read back.

A batch is everything getmany() hands over (at most batch_max_events records, waiting at most
batch_max_wait_ms for the first): it is decoded, folded (coalescing per connection), its poison
records are dead-lettered, and then it is written in one transaction together with the new
positions. While the database or broker is unavailable the same batch is retried with
exponential backoff; a retry after an unclear commit is safe because the fence turns it into a
FencedError, after which the stored positions tell whether the earlier attempt had committed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from connection_tracker.events import EventTuple, InvalidEvent, decode_record_tuple
from connection_tracker.fold import ConnectionState, fold_tuples
from connection_tracker.settings import Settings
from projector.continuity import run_from
from projector.dead_letter import DeadLetterPublisher, Rejected
from projector.metrics import ProjectorMetrics
from projector.store import CHUNK, BatchResult, FencedError, ProjectionStore

log = logging.getLogger(__name__)

T = TypeVar("T")

# What "the database or the broker is unavailable" looks like from here: anything else is a bug
# and should crash loudly rather than spin.
_TRANSIENT = (OperationalError, DBAPIError, PoolTimeoutError, OSError, KafkaError)


# Records between yields to the event loop while a batch is fetched and decoded (a few ms).
_YIELD_EVERY = 1000

# How long a partition may stay assigned without a stored position before the loop seeks it.
_STRAGGLER_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class _Fetched:
    """Records taken from the consumer for one batch, per partition, each partition's from one
    continuous read: the one begun by the seek whose stamp is recorded."""

    records: dict[TopicPartition, list[Any]]
    stamps: dict[TopicPartition, int]
    reached: dict[TopicPartition, int]  # the consumer's position after the last of them


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A decoded and folded batch, ready to be written."""

    events: list[EventTuple]
    rejected: list[Rejected]
    advances: dict[int, tuple[int, int]]  # partition -> (position it starts at, new position)
    taken: dict[int, int]  # partition -> records applied (the rest of the range holds none)
    records: int
    states: dict[str, ConnectionState]


class Abandoned(Exception):
    """stop() was called while an operation was waiting to be retried; nothing was committed."""


class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, projector: Projector) -> None:
        self._projector = projector

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self._projector._forget(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._projector._assigning += 1
        try:
            await self._projector._seek_to_stored(list(assigned))
        finally:
            self._projector._assigning -= 1


class Projector:
    """Async context manager; run() until stop() (or a signal handler calling it)."""

    def __init__(
        self, settings: Settings, store: ProjectionStore, metrics: ProjectorMetrics | None = None
    ) -> None:
        self._settings = settings
        self._store = store
        self.metrics = metrics or ProjectorMetrics()
        self._topic = settings.events_topic
        self._consumer = self._new_consumer()
        self._dead_letters = DeadLetterPublisher(
            settings.kafka_bootstrap_servers, settings.dead_letter_topic
        )
        # Stored next offset of each partition this process owns, as it last read or wrote it.
        self._expected: dict[TopicPartition, int] = {}
        self._stopping = asyncio.Event()
        self._started = False
        self._assigning = 0  # assignment listener calls in progress
        # Every seek gets a stamp; records are applied only under the stamp of the partition's
        # latest seek, whose offset is kept to tell Kafka's unused offsets from a gap.
        self._seeks = 0
        self._sought: dict[TopicPartition, tuple[int, int]] = {}  # tp -> (stamp, offset)
        self._unpositioned_since: dict[TopicPartition, float] = {}
        # Where the batch being written leaves its partitions (the next one starts there).
        self._in_flight_ends: dict[TopicPartition, int] = {}
        self._group_offsets_due: dict[TopicPartition, int] = {}
        self._group_committer: asyncio.Task[None] | None = None
        # Records (events and dead letters) this process has committed: over clean runs of all
        # processes of a group these add up to the log's length, each record exactly once.
        self.records_committed = 0

    def _new_consumer(self) -> AIOKafkaConsumer:
        s = self._settings
        return AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            group_id=s.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            session_timeout_ms=s.consumer_session_timeout_ms,
            heartbeat_interval_ms=min(3000, s.consumer_session_timeout_ms // 3),
        )

    async def start(self) -> None:
        """Connect to the broker, retrying with backoff while it is unavailable. Raises
        Abandoned if stop() is called before it succeeds."""
        if self._started:
            return
        await self._retrying("broker", self._connect)
        self._started = True

    async def _connect(self) -> None:
        try:
            await self._dead_letters.start()
            self._consumer.subscribe([self._topic], listener=_SeekToStored(self))
            await self._consumer.start()
        except BaseException:
            # aiokafka clients cannot be started again after a failed start: fresh ones for
            # the next attempt.
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            with contextlib.suppress(Exception):
                await self._dead_letters.stop()
            self._consumer = self._new_consumer()
            self._dead_letters = DeadLetterPublisher(
                self._settings.kafka_bootstrap_servers, self._settings.dead_letter_topic
            )
            raise

    async def stop(self) -> None:
        """Ask run() to finish the batch in hand and return (a batch waiting for an unavailable
        database or broker is abandoned instead: it was not committed and will be replayed)."""
        self._stopping.set()

    async def close(self) -> None:
        if not self._started:
            return
        self._started = False
        try:
            await self._consumer.stop()
        finally:
            await self._dead_letters.stop()

    async def __aenter__(self) -> Projector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        await self.close()

    @property
    def owned_positions(self) -> dict[int, int]:
        """Stored next offset of each owned partition, as this process last read or wrote it."""
        return {tp.partition: offset for tp, offset in self._expected.items()}

    # Partition ownership

    def _forget(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self._group_offsets_due.pop(tp, None)
            if self._expected.pop(tp, None) is not None:
                labels = (tp.topic, str(tp.partition))
                for gauge in (self.metrics.lag, self.metrics.last_offset):
                    with contextlib.suppress(KeyError):
                        gauge.remove(*labels)
        self.metrics.assigned.set(len(self._expected))
        if revoked:
            log.info("event=revoked partitions=%s", sorted(tp.partition for tp in revoked))

    async def _seek_to_stored(self, assigned: list[TopicPartition]) -> None:
        mine = [tp for tp in assigned if tp.topic == self._topic]
        if not mine:
            return
        try:
            positions = await self._retrying(
                "database",
                lambda: self._store.positions(self._topic, [tp.partition for tp in mine]),
            )
        except Abandoned:
            return  # stopping; the partitions stay unpositioned and their records are skipped
        owned = self._consumer.assignment()
        for tp in mine:
            if tp in owned:
                self._seek(tp, positions[tp.partition])
                self._expected[tp] = positions[tp.partition]
        self.metrics.assigned.set(len(self._expected))
        log.info(
            "event=assigned topic=%s positions=%s",
            self._topic,
            ",".join(f"{p}:{o}" for p, o in sorted(positions.items())),
        )

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        """Position a partition's reads (every seek of this process goes through here)."""
        self._seeks += 1
        self._sought[tp] = (self._seeks, offset)
        self._consumer.seek(tp, offset)

    def _stamp(self, tp: TopicPartition) -> int:
        return self._sought.get(tp, (0, 0))[0]

    # Retrying

    async def _retrying(self, cause: str, op: Callable[[], Awaitable[T]]) -> T:
        delay = 0.1
        while True:
            if self._stopping.is_set():
                raise Abandoned(cause)
            try:
                return await op()
            except _TRANSIENT as exc:
                self.metrics.retries.labels(cause).inc()
                log.warning(
                    "event=retry cause=%s delay_s=%.1f error=%r", cause, delay, _one_line(exc)
                )
            # Wake up at once on stop(): a stopping process should not sit out a backoff.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, self._settings.retry_max_backoff_seconds)

    # The loop

    async def run(self) -> None:
        """Consume and apply batches (and prune, if retention is on) until stop() is called."""
        await self.start()
        s = self._settings
        pruner = (
            asyncio.create_task(self._prune_periodically())
            if s.retention_disconnected_seconds > 0
            else None
        )
        # One batch is written while the next is fetched, decoded and folded: the database's
        # work overlaps the process's own. The next batch is prepared from the positions the
        # batch in flight will leave, and committed only if they are still the positions when
        # its turn comes (_is_current); otherwise it is dropped and its partitions re-read.
        in_flight: asyncio.Task[None] | None = None
        try:
            while not self._stopping.is_set():
                await self._position_stragglers()
                try:
                    batch = await self._retrying("broker", self._fetch)
                except Abandoned:
                    break
                prepared = None
                if batch.records:
                    planned = dict(self._expected)
                    if in_flight is not None:
                        planned |= self._in_flight_ends
                    prepared = await self._prepare(batch, planned)
                if in_flight is not None:
                    task, in_flight = in_flight, None
                    if not await self._finished(task):
                        break
                if prepared is not None:
                    if self._is_current(prepared):
                        self._in_flight_ends = {
                            TopicPartition(self._topic, p): new
                            for p, (_, new) in prepared.advances.items()
                        }
                        in_flight = asyncio.create_task(self._commit(prepared))
                    else:
                        self._rewind(prepared)
                self._update_lag()
        finally:
            if in_flight is not None:
                # Stopping: the batch in flight is finished (or abandoned if its database is
                # unavailable); a prepared one is simply not written and will be read again.
                await self._finished(in_flight)
            await self._flush_group_offsets()
            log.info(
                "event=stopped records_committed=%d positions=%s",
                self.records_committed,
                ",".join(f"{p}:{o}" for p, o in sorted(self.owned_positions.items())),
            )
            if pruner is not None:
                pruner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pruner

    @staticmethod
    async def _finished(task: asyncio.Task[None]) -> bool:
        """Wait for a batch's write; False if it was abandoned (stop() during retries)."""
        try:
            await task
        except Abandoned as exc:
            log.info("event=abandoned cause=%s: batch not committed", exc)
            return False
        return True

    def _is_current(self, prepared: _Prepared) -> bool:
        """Whether every partition of a prepared batch is still owned and stored exactly where
        the batch was prepared to start (a fence, a revocation or a seek may have moved it while
        the batch before it was written)."""
        return all(
            self._expected.get(TopicPartition(self._topic, p)) == start
            for p, (start, _) in prepared.advances.items()
        )

    def _rewind(self, prepared: _Prepared) -> None:
        """Drop a prepared batch that is no longer current: its partitions that are still
        owned are sought back to their positions, so their records are read again."""
        self.metrics.prepared_dropped.inc()
        owned = self._consumer.assignment()
        for p in prepared.advances:
            tp = TopicPartition(self._topic, p)
            position = self._expected.get(tp)
            if tp in owned and position is not None:
                self._seek(tp, position)
        log.info(
            "event=prepared_batch_dropped partitions=%s: positions moved while it was prepared",
            sorted(prepared.advances),
        )

    async def _position_stragglers(self) -> None:
        """Seek partitions that stayed assigned without a stored position: the assignment
        listener failed (aiokafka only logs its errors), and nothing of them would be applied.
        A grace period keeps this from racing a listener that is merely slow (two seeks from
        reads at different times would cost a fenced batch)."""
        now = time.monotonic()
        since = self._unpositioned_since
        assigned = self._consumer.assignment()
        for tp in [tp for tp in since if tp not in assigned or tp in self._expected]:
            del since[tp]
        unpositioned = [
            tp for tp in assigned if tp.topic == self._topic and tp not in self._expected
        ]
        late = [
            tp
            for tp in unpositioned
            if now - since.setdefault(tp, now) >= _STRAGGLER_GRACE_S and not self._assigning
        ]
        if late:
            log.warning("event=positioning_late partitions=%s", sorted(t.partition for t in late))
            await self._seek_to_stored(late)

    async def _fetch(self) -> _Fetched:
        """Up to batch_max_events records, waiting at most batch_max_wait_ms for the first.
        Taken from the fetch buffer in slices of _YIELD_EVERY with a yield to the event loop in
        between (unpacking records is CPU work that would otherwise hold the loop, and with it
        the batch in flight, for the whole batch).

        Only records of partitions this process has positioned are kept: on assignment the
        consumer starts fetching from the group's committed offset before the assignment
        listener's seek, and those records (from wherever the group offset points) are not
        the ones that follow the stored position. A partition sought again between two slices
        keeps only the records of its new read."""
        s = self._settings
        want = s.batch_max_events
        fetched = _Fetched({}, {}, {})
        size = min(_YIELD_EVERY, want)
        taken = last = await self._take(size, s.batch_max_wait_ms, fetched)
        while last == size and taken < want:  # a full slice: there may be more buffered
            await asyncio.sleep(0)
            size = min(_YIELD_EVERY, want - taken)
            last = await self._take(size, 0, fetched)
            taken += last
        return fetched

    async def _take(self, size: int, timeout_ms: int, into: _Fetched) -> int:
        """One getmany() slice into `into`; returns how many records it handed over."""
        got: dict[TopicPartition, list[Any]] = await self._consumer.getmany(
            timeout_ms=timeout_ms, max_records=size
        )
        # Nothing below suspends: position() answers at once for a partition whose records were
        # just handed over, so it is the consumer's position right after them, and no seek can
        # come in between.
        for tp, records in got.items():
            if tp not in self._expected:
                continue  # not positioned by this process (yet): not its read
            stamp = self._stamp(tp)
            if into.stamps.get(tp) != stamp:
                into.records[tp] = []
                into.stamps[tp] = stamp
            into.records[tp].extend(records)
            try:
                into.reached[tp] = await self._consumer.position(tp)
            except IllegalStateError:  # revoked: _prepare will find it unowned
                into.reached.pop(tp, None)
        return sum(map(len, got.values()))

    def _update_lag(self) -> None:
        assigned = self._consumer.assignment()
        for tp, applied in self._expected.items():
            if tp not in assigned:
                continue  # being revoked right now; the listener will forget it
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - applied)
                )

    async def _prepare(
        self, fetched: _Fetched, positions: Mapping[TopicPartition, int]
    ) -> _Prepared | None:
        """Decode and fold fetched records for a batch that is to start at these positions.
        No I/O, but it yields to the event loop every _YIELD_EVERY records: the batch in flight
        needs the loop for each of its round trips, and only once its big statement is with the
        database do the two overlap.

        A partition's records are taken only as far as projector/continuity.py allows: records
        that do not begin at the partition's position are not applied, and the partition is
        sought to that position to be read again."""
        since_yield = 0
        events: list[EventTuple] = []
        rejected: list[Rejected] = []
        advances: dict[int, tuple[int, int]] = {}
        taken: dict[int, int] = {}
        records_in_batch = 0
        for tp, records in fetched.records.items():
            start = positions.get(tp)
            if start is None:
                # Revoked while the batch was in flight, or never positioned: those records
                # are not ours to apply (the owner reads them from its stored position).
                continue
            stamp = fetched.stamps[tp]
            sought = self._sought.get(tp)
            if sought is None or sought[0] != stamp:
                continue  # sought again since they were taken: its new read brings them again
            run = run_from(records, start, read_from=sought[1], reached=fetched.reached.get(tp))
            if run.below:
                # Fetched before a seek to a later position, or the log is behind the stored
                # position (a topic recreated under the same name): already applied or not
                # this log's, skipped.
                log.warning(
                    "event=skipped_below_position topic=%s partition=%d position=%d records=%d",
                    tp.topic,
                    tp.partition,
                    start,
                    run.below,
                )
            if run.gap:
                labels = (tp.topic, str(tp.partition))
                self.metrics.position_gaps.labels(*labels).inc()
                log.warning(
                    "event=position_gap topic=%s partition=%d position=%d first_offset=%d "
                    "read_from=%d: not applied, reading the partition again from its position",
                    tp.topic,
                    tp.partition,
                    start,
                    next(r.offset for r in records if r.offset >= start),
                    sought[1],
                )
                if tp in self._consumer.assignment():
                    self._seek(tp, start)
                continue
            if not run.records:
                continue
            if run.unused:
                self.metrics.offsets_unused.labels(tp.topic, str(tp.partition)).inc(run.unused)
                log.info(
                    "event=offsets_unused topic=%s partition=%d from=%d to=%d records=%d: the "
                    "log holds no other record there (transaction markers or compaction)",
                    tp.topic,
                    tp.partition,
                    start,
                    run.end,
                    len(run.records),
                )
            for record in run.records:
                try:
                    events.append(decode_record_tuple(record.value, record.key))
                except InvalidEvent as exc:
                    rejected.append(Rejected.of(record, str(exc)))
                since_yield += 1
                if since_yield == _YIELD_EVERY:
                    since_yield = 0
                    await asyncio.sleep(0)
            advances[tp.partition] = (start, run.end)
            taken[tp.partition] = len(run.records)
            records_in_batch += len(run.records)
        if not advances:
            return None
        return _Prepared(events, rejected, advances, taken, records_in_batch, fold_tuples(events))

    async def _commit(self, prepared: _Prepared) -> None:
        """Dead-letter a prepared batch's poison records, then write it with its positions."""
        events, rejected, advances = prepared.events, prepared.rejected, prepared.advances
        records_in_batch, states = prepared.records, prepared.states
        if rejected:
            # Durable in the dead-letter topic before the position moves past them; a crash in
            # between re-sends them on replay (at least once there, never lost).
            await self._retrying("broker", lambda: self._dead_letters.publish(rejected))
            for r in rejected:
                log.warning(
                    "event=dead_lettered topic=%s partition=%d offset=%d error=%r",
                    r.topic,
                    r.partition,
                    r.offset,
                    r.error,
                )
        started = time.perf_counter()
        attempts = 0

        async def write() -> BatchResult:
            nonlocal attempts
            attempts += 1
            return await self._store.apply_batch(self._topic, advances, states)

        try:
            result = await self._retrying("database", write)
        except FencedError as exc:
            if attempts > 1 and await self._already_committed(advances):
                # The connection died after an earlier attempt's COMMIT reached the database
                # but before its answer came back: that attempt did commit this very batch.
                log.info("event=commit_confirmed: an earlier attempt of this batch had committed")
                result = BatchResult(written=len(states), suppressed=0)
            else:
                # Another owner moved on, or a rebuild switched in a generation that is further
                # on: either way the stored positions say where the rows now are.
                self.metrics.fenced.inc()
                log.warning("event=fenced error=%r; re-reading stored positions", str(exc))
                await self._seek_to_stored(list(self._expected))
                return
        elapsed = time.perf_counter() - started
        self.records_committed += records_in_batch
        self._count(events, rejected, records_in_batch, result.written, result.suppressed, elapsed)
        commit: dict[TopicPartition, int] = {}
        for partition, (_, new) in advances.items():
            tp = TopicPartition(self._topic, partition)
            if tp not in self._expected:
                # Revoked while the batch was being written (rebalance listeners run
                # concurrently): committed under the fence, but no longer ours to track.
                continue
            self._expected[tp] = new
            commit[tp] = new
            self.metrics.last_offset.labels(self._topic, str(partition)).set(new - 1)
        log.debug(
            "event=batch_applied records=%d rows=%d rejected=%d seconds=%.4f offsets=%s",
            records_in_batch,
            result.written,
            len(rejected),
            elapsed,
            # partition:from-to/records applied (a test checks each range against the log)
            ",".join(f"{p}:{a[0]}-{a[1]}/{prepared.taken[p]}" for p, a in sorted(advances.items())),
        )
        if commit:
            self._commit_group_offsets_soon(commit)

    def _commit_group_offsets_soon(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit Kafka group offsets in the background: only lag tools read them (the database
        is the truth), and waiting for the broker's answer (often 5-20 ms) after every batch
        would delay the next batch and so the freshness of the read model. One commit at a
        time; positions that arrive meanwhile are merged and go in the next one."""
        self._group_offsets_due.update(offsets)
        if self._group_committer is None or self._group_committer.done():
            self._group_committer = asyncio.create_task(self._commit_group_offsets())

    async def _commit_group_offsets(self) -> None:
        while self._group_offsets_due:
            due, self._group_offsets_due = self._group_offsets_due, {}
            assigned = self._consumer.assignment()
            mine = {tp: offset for tp, offset in due.items() if tp in assigned}
            try:
                if mine:
                    await self._consumer.commit(mine)
            except KafkaError as exc:  # only lag tools read these; the database is the truth
                log.info(
                    "event=group_commit_failed error=%r; the read model is unaffected", str(exc)
                )

    async def _flush_group_offsets(self) -> None:
        """Wait (briefly) for the last group-offset commit, so lag tools see the final
        positions after a clean stop."""
        committer = self._group_committer
        if committer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(committer, 10)

    async def _already_committed(self, advances: dict[int, tuple[int, int]]) -> bool:
        """Whether every partition of the batch is stored exactly at the batch's end."""
        stored = await self._retrying(
            "database", lambda: self._store.positions(self._topic, list(advances))
        )
        return all(stored[p] == new for p, (_, new) in advances.items())

    def _count(
        self,
        events: list[EventTuple],
        rejected: list[Rejected],
        records: int,
        written: int,
        suppressed: int,
        elapsed: float,
    ) -> None:
        m = self.metrics
        m.batch_seconds.observe(elapsed)
        m.batch_records.observe(records)
        m.batches.inc()
        # One labels() lookup per kind, not per event: this runs for every batch.
        for payload_type, n in collections.Counter(type(e[4]) for e in events).items():
            m.events_applied.labels(payload_type.__name__.lower()).inc(n)
        if rejected:
            m.dead_lettered.inc(len(rejected))
        m.rows_written.inc(written)
        if suppressed:
            m.suppressed.inc(suppressed)

    # Retention

    async def _prune_periodically(self) -> None:
        s = self._settings
        while not self._stopping.is_set():
            try:
                await self.prune_once()
            except Abandoned:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), s.retention_interval_seconds)

    async def prune_once(self, now_ns: int | None = None) -> int:
        """Prune everything due now, in small transactions. Returns the rows pruned."""
        s = self._settings
        now_ns = time.time_ns() if now_ns is None else now_ns
        before = now_ns - s.retention_disconnected_seconds * 1_000_000_000
        # A tombstone younger than the retention age would be useless: it is kept at least as
        # long as the rows themselves are.
        tombstone_age_s = max(s.retention_tombstone_seconds, s.retention_disconnected_seconds)
        tombstones_before = (
            now_ns - tombstone_age_s * 1_000_000_000 if s.retention_tombstone_seconds > 0 else None
        )
        total = 0
        while True:
            result = await self._retrying(
                "database", lambda: self._store.prune(before, tombstones_before, CHUNK)
            )
            total += result.pruned
            self.metrics.pruned.inc(result.pruned)
            self.metrics.tombstones_expired.inc(result.tombstones_expired)
            if result.pruned < CHUNK and result.tombstones_expired < CHUNK:
                break
            await asyncio.sleep(0)  # let batches in between: pruning is never urgent
        if total:
            log.info("event=pruned rows=%d disconnected_before_ns=%d", total, before)
        return total


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
