"""The projector process: consume the events topic in batches and apply them to the store.

The roles, each in its own module:
- partitions.py: which partitions this process owns, the stored positions it sought them to
  (positions live in the read-model database, not in Kafka), and the assignment listener;
- continuity.py: which fetched records a batch may apply;
- core/batch.py: decoding records into a batch, and writing one batch while the
  next is prepared (the same pipeline a rebuild uses);
- core/retry.py: waiting out an unavailable database or broker;
- group_offsets.py: Kafka group offsets, for lag tools only;
- retention.py: pruning long-disconnected connections;
- this module: the consumer's lifecycle and the loop.

A batch is everything getmany() hands over (at most batch_max_events records, waiting at most
batch_max_wait_ms for the first): it is decoded, folded (coalescing per connection), its poison
records are dead-lettered, and then it is written in one transaction together with the new
positions. While the database or broker is unavailable the same batch is retried with backoff;
a retry after an unclear commit is safe because the fence turns it into a FencedError, after
which the stored positions tell whether the earlier attempt had committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError

from conntrack.core import kafka, tracing
from conntrack.core.batch import YIELD_EVERY, Batch, WriteBehind
from conntrack.core.fold import ConnectionState, NodeState
from conntrack.core.history_store import NodeHistory
from conntrack.core.kafka import KafkaConnection
from conntrack.core.retry import TRANSIENT, Abandoned, Backoff, Retrier
from conntrack.core.settings import Settings
from conntrack.core.statistics import EarlyStatistics
from conntrack.core.store import (
    REFUSALS,
    BatchResult,
    FencedError,
    OnRefused,
    ProjectionStore,
)
from conntrack.projector.continuity import run_from
from conntrack.projector.dead_letter import DeadLetterPublisher, Rejected
from conntrack.projector.group_offsets import GroupOffsets
from conntrack.projector.metrics import ProjectorMetrics
from conntrack.projector.partitions import Partitions
from conntrack.projector.retention import Retention

__all__ = ["Abandoned", "Projector"]

log = logging.getLogger(__name__)


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

    batch: Batch
    states: dict[str, ConnectionState]
    nodes: dict[str, NodeState]
    history: NodeHistory
    records: dict[TopicPartition, list[Any]]  # what the batch was decoded from
    stamps: dict[TopicPartition, int]  # the seeks whose reads they were


class Projector:
    """Async context manager; run() until stop() (or a signal handler calling it)."""

    def __init__(
        self, settings: Settings, store: ProjectionStore, metrics: ProjectorMetrics | None = None
    ) -> None:
        self._settings = settings
        self._store = store
        self.metrics = metrics or ProjectorMetrics()
        self._topic = settings.events_topic
        self._stopping = asyncio.Event()
        self._retry = Retrier(
            Backoff(settings.retry_max_backoff_seconds),
            self._stopping,
            on_retry=lambda cause: self.metrics.retries.labels(cause).inc(),
            logger=log,
        )
        self._partitions = Partitions(self._topic, store, self.metrics, self._retry)
        self._group_offsets = GroupOffsets()
        self._partitions.on_revoked.append(self._group_offsets.forget)
        self._retention = Retention(settings, store, self.metrics, self._retry, self._stopping)
        tables = store.tables
        self._statistics = EarlyStatistics(
            store.engine, (tables.connections, tables.connection_labels)
        )
        self._kafka = KafkaConnection.from_settings(settings, "projector")
        self._consumer = self._new_consumer()
        self._dead_letters = self._new_dead_letters()
        self._spent_clients = False
        self._started = False
        # Where the batch being written leaves its partitions (the next one starts there), with
        # each partition's seek stamp when it was prepared: a partition sought since (assigned
        # again in a rebalance, or re-read after a fence) starts where that seek put it.
        self._in_flight_ends: dict[TopicPartition, tuple[int, int]] = {}
        # Records (events and dead letters) this process has committed: over clean runs of all
        # processes of a group these add up to the log's length, each record exactly once.
        self.records_committed = 0

    def _new_consumer(self) -> AIOKafkaConsumer:
        s = self._settings
        consumer = AIOKafkaConsumer(
            **self._kafka.options(),
            group_id=s.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            session_timeout_ms=s.consumer_session_timeout_ms,
            heartbeat_interval_ms=min(3000, s.consumer_session_timeout_ms // 3),
        )
        self._partitions.consumer = consumer
        self._group_offsets.consumer = consumer
        return consumer

    def _new_dead_letters(self) -> DeadLetterPublisher:
        s = self._settings
        return DeadLetterPublisher(self._kafka, s.dead_letter_topic)

    # Lifecycle

    async def start(self) -> None:
        """Connect to the broker, retrying with backoff while it is unavailable. Raises
        Abandoned if stop() is called before it succeeds."""
        if self._started:
            return
        await self._retry("broker", self._connect)
        self._started = True

    async def _connect(self) -> None:
        if self._spent_clients:
            # aiokafka clients cannot be started again after a failed start: fresh ones for
            # this attempt (made only now, so that an abandoned start leaves none unclosed).
            self._consumer = self._new_consumer()
            self._dead_letters = self._new_dead_letters()
            self._spent_clients = False
        try:
            await self._dead_letters.start()
            self._consumer.subscribe([self._topic], listener=self._partitions.listener())
            await kafka.start(self._consumer, self._kafka)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            with contextlib.suppress(Exception):
                await self._dead_letters.stop()
            self._spent_clients = True
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
        return {tp.partition: offset for tp, offset in self._partitions.positions.items()}

    async def prune_once(self, now_ns: int | None = None) -> int:
        """Prune everything retention says is due now. Returns the rows pruned."""
        return await self._retention.prune_once(now_ns)

    # The loop

    async def run(self) -> None:
        """Consume and apply batches (and prune, if retention is on) until stop() is called."""
        await self.start()
        pruner = asyncio.create_task(self._retention.run()) if self._retention.enabled else None
        # One batch is written while the next is fetched, decoded and folded: the database's
        # work overlaps the process's own. The next batch is prepared from the positions the
        # batch in flight will leave, and committed only if they are still the positions when
        # its turn comes (_is_current); otherwise it is dropped and its partitions re-read.
        writing = WriteBehind()
        try:
            while not self._stopping.is_set():
                await self._partitions.position_stragglers()
                try:
                    fetched = await self._retry("broker", self._fetch)
                except Abandoned:
                    break
                prepared = None
                if fetched.records:
                    planned = dict(self._partitions.positions)
                    if writing.busy:
                        stamp = self._partitions.stamp
                        planned |= {
                            tp: end
                            for tp, (end, sought) in self._in_flight_ends.items()
                            if stamp(tp) == sought
                        }
                    prepared = await self._prepare(fetched, planned)
                if writing.busy and not await self._finished(writing):
                    if prepared is not None:
                        log.info(
                            "event=abandoned stage=prepared records=%d: decoded behind the "
                            "abandoned batch, not written; read again from the stored positions",
                            prepared.batch.records,
                        )
                    break
                if prepared is not None:
                    if self._is_current(prepared):
                        self._in_flight_ends = {
                            tp: (new, prepared.stamps.get(tp, -1))
                            for p, (_, new) in prepared.batch.advances.items()
                            if (tp := TopicPartition(self._topic, p))
                        }
                        writing.start(self._commit(prepared))
                    else:
                        self._rewind(prepared)
                self._partitions.update_lag()
                self.metrics.last_poll.set_to_current_time()
        finally:
            # Stopping: the batch in flight is finished (or abandoned if its database is
            # unavailable); a prepared one is simply not written and will be read again.
            if writing.busy:
                await self._finished(writing)
            await self._group_offsets.flush()
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
    async def _finished(writing: WriteBehind) -> bool:
        """Wait for a batch's write; False if it was abandoned (stop() during retries)."""
        try:
            await writing.finish()
        except Abandoned as exc:
            log.info(
                "event=abandoned %s: stopped while waiting for it; nothing of the batch was "
                "committed, it is read again from the stored positions",
                exc,
            )
            return False
        return True

    def _is_current(self, prepared: _Prepared) -> bool:
        """Whether every partition of a prepared batch is still owned and stored exactly where
        the batch was prepared to start (a fence, a revocation or a seek may have moved it while
        the batch before it was written)."""
        positions = self._partitions.positions
        return all(
            positions.get(TopicPartition(self._topic, p)) == start
            for p, (start, _) in prepared.batch.advances.items()
        )

    def _rewind(self, prepared: _Prepared) -> None:
        """Drop a prepared batch that is no longer current: its partitions that are still
        owned are sought back to their positions, so their records are read again."""
        self.metrics.prepared_dropped.inc()
        self._partitions.rewind(list(prepared.batch.advances))
        log.info(
            "event=prepared_batch_dropped partitions=%s: positions moved while it was prepared",
            sorted(prepared.batch.advances),
        )

    # Fetching and preparing

    async def _fetch(self) -> _Fetched:
        """Up to batch_max_events records, waiting at most batch_max_wait_ms for the first.
        Taken from the fetch buffer in slices of YIELD_EVERY with a yield to the event loop in
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
        size = min(YIELD_EVERY, want)
        taken = last = await self._take(size, s.batch_max_wait_ms, fetched)
        while last == size and taken < want:  # a full slice: there may be more buffered
            await asyncio.sleep(0)
            size = min(YIELD_EVERY, want - taken)
            last = await self._take(size, 0, fetched)
            taken += last
        return fetched

    async def _take(self, size: int, timeout_ms: int, into: _Fetched) -> int:
        """One getmany() slice into `into`; returns how many records it handed over."""
        got: dict[TopicPartition, list[Any]] = await self._consumer.getmany(
            timeout_ms=timeout_ms, max_records=size
        )
        positioned = self._partitions.positions
        # Nothing below suspends: position() answers at once for a partition whose records were
        # just handed over, so it is the consumer's position right after them, and no seek can
        # come in between.
        for tp, records in got.items():
            if tp not in positioned:
                continue  # not positioned by this process (yet): not its read
            stamp = self._partitions.stamp(tp)
            if into.stamps.get(tp) != stamp:
                into.records[tp] = []
                into.stamps[tp] = stamp
            into.records[tp].extend(records)
            try:
                into.reached[tp] = await self._consumer.position(tp)
            except IllegalStateError:  # revoked: _prepare will find it unowned
                into.reached.pop(tp, None)
        return sum(map(len, got.values()))

    async def _prepare(
        self, fetched: _Fetched, positions: Mapping[TopicPartition, int]
    ) -> _Prepared | None:
        """Decode and fold fetched records for a batch that is to start at these positions.
        No I/O, but it yields to the event loop every YIELD_EVERY records: the batch in flight
        needs the loop for each of its round trips, and only once its big statement is with the
        database do the two overlap.

        A partition's records are taken only as far as projector/continuity.py allows: records
        that do not begin at the partition's position are not applied, and the partition is
        sought to that position to be read again."""
        batch = Batch({tp.partition: start for tp, start in positions.items()})
        for tp, records in fetched.records.items():
            start = positions.get(tp)
            if start is None:
                # Revoked while the batch was in flight, or never positioned: those records
                # are not ours to apply (the owner reads them from its stored position).
                continue
            sought = self._partitions.sought(tp)
            if sought is None or sought[0] != fetched.stamps[tp]:
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
                self._gap(tp, start, records, sought[1])
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
            for i in range(0, len(run.records), YIELD_EVERY):
                chunk = run.records[i : i + YIELD_EVERY]
                end = run.end if i + YIELD_EVERY >= len(run.records) else None
                batch.add(tp.partition, chunk, end)
                await asyncio.sleep(0)
        if not batch.advances:
            return None
        return _Prepared(
            batch,
            batch.fold(),
            batch.fold_nodes(),
            batch.node_history(),
            fetched.records,
            fetched.stamps,
        )

    def _gap(self, tp: TopicPartition, start: int, records: list[Any], read_from: int) -> None:
        self.metrics.position_gaps.labels(tp.topic, str(tp.partition)).inc()
        log.warning(
            "event=position_gap topic=%s partition=%d position=%d first_offset=%d "
            "read_from=%d: not applied, reading the partition again from its position",
            tp.topic,
            tp.partition,
            start,
            next(r.offset for r in records if r.offset >= start),
            read_from,
        )
        if tp in self._partitions.assignment():
            self._partitions.seek(tp, start)

    # Writing

    async def _commit(self, prepared: _Prepared) -> None:
        """Dead-letter a prepared batch's poison records, then write it with its positions."""
        with tracing.applying(
            self._topic,
            lambda: (r.headers for rs in prepared.records.values() for r in rs),
            prepared.batch.records,
        ):
            await self._write(prepared)

    async def _write(self, prepared: _Prepared) -> None:
        batch, states = prepared.batch, prepared.states
        advances = batch.advances
        if batch.rejected:
            rejected = [Rejected.of(record, error) for record, error in batch.rejected]
            # Durable in the dead-letter topic before the position moves past them; a crash in
            # between re-sends them on replay (at least once there, never lost).
            try:
                await self._retry("broker", lambda: self._dead_letters.publish(rejected))
            except Abandoned:
                raise Abandoned(
                    f"stage=dead_lettering cause=broker records={batch.records}"
                ) from None
        started = time.perf_counter()
        attempts = refusals = 0

        async def write() -> BatchResult:
            nonlocal attempts, refusals
            attempts += 1
            # A batch the database keeps refusing would stall its partitions for good: after
            # refused_batch_attempts, the refused rows are found and their records dead-lettered.
            # (A database that is down raises other errors, and is waited for.)
            isolate = (
                self._dead_letter_refused(prepared)
                if refusals >= self._settings.refused_batch_attempts
                else None
            )
            try:
                return await self._store.apply_batch(
                    self._topic, advances, states, prepared.nodes, isolate, prepared.history
                )
            except REFUSALS:
                refusals += 1
                raise

        try:
            result = await self._retry("database", write)
        except Abandoned:
            raise Abandoned(f"stage=writing cause=database records={batch.records}") from None
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
                await self._partitions.seek_to_stored(list(self._partitions.positions))
                return
        elapsed = time.perf_counter() - started
        self.records_committed += batch.records
        self.metrics.batch_committed(batch, result, elapsed)
        self.metrics.applied(prepared.records)
        commit: dict[TopicPartition, int] = {}
        for partition, (_, new) in advances.items():
            tp = self._partitions.advanced(partition, new)
            if tp is not None:
                commit[tp] = new
        log.debug(
            "event=batch_applied records=%d rows=%d rejected=%d seconds=%.4f offsets=%s",
            batch.records,
            result.written,
            len(batch.rejected),
            elapsed,
            # partition:from-to/records applied (a test checks each range against the log)
            ",".join(f"{p}:{a[0]}-{a[1]}/{batch.taken[p]}" for p, a in sorted(advances.items())),
        )
        if commit:
            self._group_offsets.commit_soon(commit)
        if not self._statistics.done:
            try:
                await self._statistics.after_write()
            except TRANSIENT as exc:  # tried again after the next batch
                log.info("event=analyze_skipped error=%r", str(exc))

    def _dead_letter_refused(self, prepared: _Prepared) -> OnRefused:
        """What to do with connections the database refused: their records of this batch go to
        the dead-letter topic with the database's error, before the batch commits."""

        async def dead_letter(refused: dict[str, str]) -> None:
            keys = {cid.encode(): error for cid, error in refused.items()}
            advances = prepared.batch.advances
            poison = {(r.partition, r.offset) for r, _ in prepared.batch.rejected}
            rejected = [
                Rejected.of(record, keys[record.key])
                for tp, records in prepared.records.items()
                if tp.partition in advances
                for record in records
                if record.key in keys
                and advances[tp.partition][0] <= record.offset < advances[tp.partition][1]
                and (record.partition, record.offset) not in poison  # dead-lettered already
            ]
            await self._dead_letters.publish(rejected)
            self.metrics.dead_lettered.inc(len(rejected))

        return dead_letter

    async def _already_committed(self, advances: dict[int, tuple[int, int]]) -> bool:
        """Whether every partition of the batch is stored exactly at the batch's end."""
        stored = await self._retry(
            "database", lambda: self._store.positions(self._topic, list(advances))
        )
        return all(stored[p] == new for p, (_, new) in advances.items())
