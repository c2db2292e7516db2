"""The lifecycle role's process: read the events topic, tell each connection's opened and closed
on the lifecycle topic, fence lost nodes, in Kafka transactions (docs/lifecycle.md).

One transaction holds everything a slice of the log caused: the told records, the changes of
the role's state (a compacted topic, fences decided included) and the consumed offsets of the
events topic (send_offsets_to_transaction). A read_committed consumer of the lifecycle topic
therefore sees each record exactly once whatever process is killed: a transaction that did not
commit is aborted (by the broker's timeout, or at once by the next process with the same
transactional id) together with its offsets and state, and the next process reads the same
records again from the committed offsets with the state they were committed with.

A fence decided is published once its transaction has committed: NodeFenced on the events topic
and a notice to the node on the commands topic, by an ordinary idempotent producer, and marked
published in the next transaction (a restart publishes again what is not marked; the fold and
the node take a repeated fence as one). Not inside the transaction, because a transaction open
on the events topic would hold every read_committed reader of that partition (the projector, if
it read so) until it ended, and a process killed mid-transaction leaves it open until the
broker's transaction timeout.

One process at a time does the work: the transactional id is the role's, and a second process
started with it fences the first (whose next commit fails; it stops with a warning). The state
is restored from the state topic on every start, and again after any error, so the state in
memory never runs ahead of what is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from conntrack.core import aiokafka_internals, kafka
from conntrack.core.events import InvalidEvent, decode_record_tuple
from conntrack.core.kafka import KafkaConnection, partition_of
from conntrack.core.retry import Abandoned, Backoff, one_line
from conntrack.core.settings import Settings
from conntrack.core.timeutil import NANOS_PER_SECOND
from conntrack.lifecycle.metrics import LifecycleMetrics
from conntrack.lifecycle.records import (
    fence_event_record,
    fence_notice_record,
    lifecycle_record,
)
from conntrack.lifecycle.telling import Fence, Reason, Teller, Told
from conntrack.producer.topics import (
    broker_count,
    default_replication,
    ensure_topics,
    lifecycle_specs,
)

log = logging.getLogger(__name__)

_MAX_RECORDS: Final = 20_000
# How often closed connections past the memory window are forgotten.
_FORGET_EVERY_S: Final = 60.0
# A partition counts as read to its end for this long after a fetch said so.
_CAUGHT_UP_FRESH_MS: Final = 5000
_REASON_NAMES: Final = {v: k.lower() for k, v in vars(Reason).items() if k.isupper()}


class Superseded(Exception):
    """Another process took the role's transactional id: this one stops."""


class MissingTopicError(Exception):
    """A topic the role reads or writes to does not exist (the message says which)."""


class LifecycleRole:
    def __init__(
        self,
        settings: Settings,
        *,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        metrics: LifecycleMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._kafka = KafkaConnection.from_settings(settings, "lifecycle")
        self._wall_clock_ns = wall_clock_ns
        self.metrics = metrics or LifecycleMetrics()
        self._stopping = asyncio.Event()
        self._backoff = Backoff(settings.retry_max_backoff_seconds)
        self.teller = self._new_teller()
        # Events topic partitions -> the next offset to read (all before it committed).
        self._positions: dict[TopicPartition, int] = {}
        # Set while the role reads the log (restored and sought); cleared by a restart.
        self.reading = asyncio.Event()
        self._ever_read = False

    @property
    def positions(self) -> dict[int, int]:
        """Committed next offset of each partition of the events topic."""
        return {tp.partition: offset for tp, offset in self._positions.items()}

    def _new_teller(self) -> Teller:
        s = self._settings
        return Teller(
            lease_ns=round(s.node_lease_seconds * NANOS_PER_SECOND),
            remember_closed_ns=round(s.lifecycle_remember_closed_seconds * NANOS_PER_SECOND),
        )

    async def stop(self) -> None:
        """Ask run() to commit what it holds and return."""
        self._stopping.set()

    async def run(self) -> None:
        """Until stop(): provision the topics, restore, and tell. An error of the broker drops
        the state and starts over from what is committed, after a backoff. Raises Superseded
        when another process took the role, MissingTopicError when a topic it reads is not
        there, Abandoned when stopped before the first start."""
        delays = self._backoff.delays()
        started = False
        while not self._stopping.is_set():
            try:
                await self._session()
            except ProducerFenced as exc:
                raise Superseded(
                    f"another conntrack-lifecycle took transactional id "
                    f"{self._settings.lifecycle_transactional_id!r}"
                ) from exc
            except (KafkaError, OSError) as exc:
                started = started or self._ever_read
                if self._stopping.is_set():
                    break
                delay = next(delays)
                if started:
                    cause = type(exc).__name__
                    self.metrics.restarts.labels(cause).inc()
                    log.warning(
                        "event=restart cause=%s delay_s=%.1f error=%r: the state is restored "
                        "from what was committed",
                        cause,
                        delay,
                        one_line(exc),
                    )
                else:
                    log.warning(
                        "event=retry cause=broker delay_s=%.1f error=%r", delay, one_line(exc)
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
            else:
                delays = self._backoff.delays()
        if not (started or self._ever_read):
            raise Abandoned("broker")

    async def _session(self) -> None:
        s = self._settings
        producer = consumer = plain = None
        try:
            consumer = AIOKafkaConsumer(
                **self._kafka.options(),
                group_id=s.lifecycle_group,
                enable_auto_commit=False,
                isolation_level="read_committed",
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=4 * 1024 * 1024,
            )
            await kafka.start(consumer, self._kafka)
            partitions = await self._check_topics(consumer)
            plain = AIOKafkaProducer(**self._kafka.options(), enable_idempotence=True, acks="all")
            await kafka.start(plain, self._kafka)
            producer = AIOKafkaProducer(
                **self._kafka.options(),
                transactional_id=s.lifecycle_transactional_id,
                enable_idempotence=True,
                acks="all",
                linger_ms=5,
                max_batch_size=1 << 20,
            )
            # Starting it fences any earlier process with this transactional id and aborts its
            # open transaction, so what is read below is all that will ever be committed.
            await kafka.start(producer, self._kafka)
            replication, min_isr = default_replication(await broker_count(self._kafka))
            await ensure_topics(
                self._kafka,
                lifecycle_specs(
                    s.lifecycle_topic, s.lifecycle_state_topic, partitions, replication, min_isr
                ),
            )
            started_at = time.monotonic()
            self.teller = self._new_teller()
            await self._restore()
            self.metrics.restore_seconds.set(time.monotonic() - started_at)
            await self._seek(consumer, partitions)
            await self._publish_fences(plain, producer, self.teller.unpublished_fences())
            log.info(
                "event=started open_connections=%d partitions=%d restore_s=%.2f",
                self.teller.open_count,
                len(self._positions),
                time.monotonic() - started_at,
            )
            self._ever_read = True
            self.reading.set()
            await self._loop(consumer, producer, plain)
        finally:
            self.reading.clear()
            await kafka.close(consumer, producer, plain)

    async def _check_topics(self, consumer: AIOKafkaConsumer) -> int:
        """The events topic's partition count, once it and the commands topic exist."""
        s = self._settings
        counts = {}
        for topic in (s.events_topic, s.commands_topic):
            parts = await aiokafka_internals.topic_partitions(consumer, topic)
            if not parts:
                raise MissingTopicError(
                    f"topic {topic} does not exist at {s.kafka_bootstrap_servers}; create it "
                    "with `conntrack-producer topics`"
                )
            counts[topic] = len(parts)
        return counts[s.events_topic]

    async def _restore(self) -> None:
        """Read the whole state topic (committed records only) into a new teller."""
        s = self._settings
        consumer = AIOKafkaConsumer(
            **self._kafka.options(),
            isolation_level="read_committed",
            enable_auto_commit=False,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        try:
            await kafka.start(consumer, self._kafka)
            parts = await aiokafka_internals.topic_partitions(consumer, s.lifecycle_state_topic)
            tps = [TopicPartition(s.lifecycle_state_topic, p) for p in sorted(parts or ())]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            remaining = {tp for tp in tps if ends[tp] > 0}
            while remaining:
                data = await consumer.getmany(*remaining, timeout_ms=500, max_records=_MAX_RECORDS)
                for records in data.values():
                    for r in records:
                        key = r.key.decode()
                        if r.value is None:
                            self.teller.forget_restored(key)
                        else:
                            self.teller.restore(key, r.value.decode())
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
        finally:
            await kafka.close(consumer)

    async def _seek(self, consumer: AIOKafkaConsumer, partitions: int) -> None:
        """Every partition of the events topic from its committed offset (the first start: from
        the log's beginning, so every connection in the history is told)."""
        topic = self._settings.events_topic
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        self._positions = {}
        for tp in tps:
            committed = await aiokafka_internals.committed_offset(consumer, tp)
            if committed is None:
                await consumer.seek_to_beginning(tp)
                self._positions[tp] = await consumer.position(tp)
            else:
                consumer.seek(tp, committed)
                self._positions[tp] = committed

    async def _loop(
        self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, plain: AIOKafkaProducer
    ) -> None:
        s = self._settings
        forget_at = time.monotonic() + _FORGET_EVERY_S

        def caught_up(read: dict[TopicPartition, int]) -> bool:
            """Every partition read to its end, as fetches said within _CAUGHT_UP_FRESH_MS."""
            now_ms = time.time() * 1000
            for tp, position in read.items():
                end = consumer.last_stable_offset(tp)
                polled = consumer.last_poll_timestamp(tp)
                if (
                    end is None
                    or end < 0
                    or polled is None
                    or now_ms - polled > _CAUGHT_UP_FRESH_MS
                ):
                    return False
                if position < end:
                    return False
            return True

        while not self._stopping.is_set():
            data = await consumer.getmany(
                timeout_ms=s.lifecycle_commit_interval_ms, max_records=_MAX_RECORDS
            )
            oldest_ms: int | None = None
            advanced: dict[TopicPartition, int] = {}
            for tp, records in data.items():
                for r in records:
                    try:
                        event = decode_record_tuple(r.value, r.key)
                    except InvalidEvent:
                        continue  # the projector dead-letters it; it tells nothing
                    self.teller.on_event(tp.partition, event)
                if records:
                    advanced[tp] = records[-1].offset + 1
                    first_ms = records[0].timestamp
                    oldest_ms = first_ms if oldest_ms is None else min(oldest_ms, first_ms)
            read = {**self._positions, **advanced}
            fences = self.teller.due_fences(self._wall_clock_ns(), caught_up(read))
            if time.monotonic() >= forget_at:
                self.teller.forget_closed()
                forget_at = time.monotonic() + _FORGET_EVERY_S
            told, changes = self.teller.take()
            if advanced or told or changes or fences:
                began = time.monotonic()
                await self._commit(producer, told, changes, advanced)
                self._positions.update(advanced)
                self.metrics.transaction_seconds.observe(time.monotonic() - began)
                self.metrics.transactions.inc()
                for t in told:
                    reason = _REASON_NAMES[t.reason] if t.kind == "closed" else ""
                    self.metrics.told.labels(t.kind, reason).inc()
                self.metrics.fences.inc(len(fences))
                for fence in fences:
                    log.warning(
                        "event=node_fenced node_id=%s incarnation=%d gateway_id=%s: silent for "
                        "longer than the lease (%g s); its connections are closed (node_lost)",
                        fence.node_id,
                        fence.incarnation,
                        fence.gateway_id,
                        s.node_lease_seconds,
                    )
                await self._publish_fences(plain, producer, fences)
            now_ms = time.time() * 1000
            self.metrics.lag_seconds.set(
                0 if oldest_ms is None else max(0.0, (now_ms - oldest_ms) / 1000)
            )
            self.metrics.last_commit.set(now_ms / 1000)
            self.metrics.open_connections.set(self.teller.open_count)
            behind = 0
            for tp, position in self._positions.items():
                end = consumer.highwater(tp)
                if end is not None and end > position:
                    behind += end - position
            self.metrics.lag_records.set(behind)

    async def _commit(
        self,
        producer: AIOKafkaProducer,
        told: list[Told],
        changes: dict[str, str | None],
        advanced: dict[TopicPartition, int],
    ) -> None:
        s = self._settings
        async with producer.transaction():
            records = map(lifecycle_record, told)
            await _send_batched(
                producer, s.lifecycle_topic, ((r.key, r.value, r.headers) for r in records)
            )
            states: Iterable[_Out] = (
                (key.encode(), None if value is None else value.encode(), [])
                for key, value in changes.items()
            )
            await _send_batched(producer, s.lifecycle_state_topic, states)
            offsets = dict(advanced) or dict(self._positions)
            await producer.send_offsets_to_transaction(offsets, s.lifecycle_group)

    async def _publish_fences(
        self, plain: AIOKafkaProducer, producer: AIOKafkaProducer, fences: list[Fence]
    ) -> None:
        """Publish each fence's NodeFenced and notice, acknowledged, then mark them published
        (a transaction of state changes alone)."""
        if not fences:
            return
        s = self._settings
        sent = []
        for fence in fences:
            for topic, record in (
                (s.events_topic, fence_event_record(fence)),
                (s.commands_topic, fence_notice_record(fence, s.lifecycle_transactional_id)),
            ):
                sent.append(
                    await plain.send(
                        topic, key=record.key, value=record.value, headers=record.headers
                    )
                )
        await asyncio.gather(*sent)
        for fence in fences:
            self.teller.fence_published(fence)
        told, changes = self.teller.take()
        await self._commit(producer, told, changes, {})


# A record to hand over: key, value (None: a tombstone), headers.
_Out = tuple[bytes, bytes | None, list[tuple[str, bytes]]]


async def _send_batched(producer: AIOKafkaProducer, topic: str, records: Iterable[_Out]) -> None:
    """Hand records to the producer a partition's batch at a time (each record on its key's
    partition, as the default partitioner places it, in order): far less work per record than
    send(). The transaction's commit waits for their delivery."""
    partitions = len(await producer.partitions_for(topic))
    by_partition: dict[int, list[_Out]] = {}
    for record in records:
        by_partition.setdefault(partition_of(record[0], partitions), []).append(record)
    for partition, part in by_partition.items():
        batch = producer.create_batch()
        for key, value, headers in part:
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                # Full: send it, and start the next one with this record.
                await producer.send_batch(batch, topic, partition=partition)
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None, headers=headers)
        await producer.send_batch(batch, topic, partition=partition)
