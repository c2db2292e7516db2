"""The projector process: consume the events topic in batches and apply them to the store.

Positions live in the read-model database (ProjectionStore), not in Kafka: on partition
assignment the consumer seeks to the stored positions ("Storing Offsets Outside Kafka" in the
aiokafka docs). Kafka group offsets are committed after each database commit only so that
standard lag tools see progress; they are never read back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from sqlalchemy.exc import DBAPIError, OperationalError

from connection_tracker.events import Event, InvalidEvent, decode
from connection_tracker.settings import Settings
from projector.dead_letter import DeadLetterPublisher, Rejected
from projector.fold import fold
from projector.metrics import ProjectorMetrics
from projector.store import FencedError, ProjectionStore

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0


class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, projector: Projector) -> None:
        self._projector = projector

    async def on_partitions_revoked(self, revoked: Any) -> None:
        for tp in revoked:
            self._projector._expected.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._projector._seek_to_stored(list(assigned))


class Projector:
    """Async context manager; run() until stop() (or a signal handler calling it)."""

    def __init__(
        self, settings: Settings, store: ProjectionStore, metrics: ProjectorMetrics | None = None
    ) -> None:
        self._settings = settings
        self._store = store
        self.metrics = metrics or ProjectorMetrics()
        self._topic = settings.events_topic
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=settings.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self._dead_letters = DeadLetterPublisher(
            settings.kafka_bootstrap_servers, settings.dead_letter_topic
        )
        # Stored next offset of each partition this process owns, as it last read or wrote it.
        self._expected: dict[TopicPartition, int] = {}
        self._stopping = asyncio.Event()
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        await self._dead_letters.start()
        try:
            self._consumer.subscribe([self._topic], listener=_SeekToStored(self))
            await self._consumer.start()
        except BaseException:
            await self._dead_letters.stop()
            raise
        self._started = True

    async def stop(self) -> None:
        """Ask run() to finish the batch in hand and return; then release the consumer."""
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

    async def _seek_to_stored(self, assigned: list[TopicPartition]) -> None:
        mine = [tp for tp in assigned if tp.topic == self._topic]
        if not mine:
            return
        positions = await self._retrying(
            "database", lambda: self._store.positions(self._topic, [tp.partition for tp in mine])
        )
        for tp in mine:
            self._consumer.seek(tp, positions[tp.partition])
            self._expected[tp] = positions[tp.partition]
        log.info("assigned %s at stored positions %s", sorted(tp.partition for tp in mine), positions)

    async def _retrying(self, cause: str, op: Any) -> Any:
        delay = 0.1
        while True:
            try:
                return await op()
            except (OperationalError, DBAPIError, OSError, KafkaError) as exc:
                if self._stopping.is_set():
                    raise
                self.metrics.retries.labels(cause).inc()
                log.warning("%s unavailable (%s); retrying in %.1fs", cause, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF_S)

    async def run(self) -> None:
        """Consume and apply batches until stop() is called."""
        await self.start()
        s = self._settings
        while not self._stopping.is_set():
            batch = await self._consumer.getmany(
                timeout_ms=s.batch_max_wait_ms, max_records=s.batch_max_events
            )
            if batch:
                await self.apply(batch)

    async def apply(self, batch: dict[TopicPartition, list[Any]]) -> None:
        events: list[Event] = []
        rejected: list[Rejected] = []
        advances: dict[int, tuple[int, int]] = {}
        for tp, records in batch.items():
            expected = self._expected.get(tp)
            if expected is None or not records:
                continue  # revoked while the batch was in flight
            for record in records:
                try:
                    events.append(decode(record.value, record.key))
                except InvalidEvent as exc:
                    rejected.append(Rejected.of(record, str(exc)))
            advances[tp.partition] = (expected, records[-1].offset + 1)
        if not advances:
            return
        states = fold(events)
        if rejected:
            # Durable in the dead-letter topic before the position moves past them; a crash in
            # between re-sends them on replay (at least once there, never lost).
            await self._retrying("broker", lambda: self._dead_letters.publish(rejected))
        started = time.perf_counter()
        try:
            await self._retrying(
                "database", lambda: self._store.apply_batch(self._topic, advances, states)
            )
        except FencedError as exc:
            self.metrics.fenced.inc()
            log.warning("%s; re-reading stored positions", exc)
            await self._seek_to_stored(list(self._expected))
            return
        m = self.metrics
        m.batch_seconds.observe(time.perf_counter() - started)
        m.batches.inc()
        for event in events:
            m.events_applied.labels(event.kind).inc()
        m.dead_lettered.inc(len(rejected))
        commit: dict[TopicPartition, int] = {}
        for partition, (_, new) in advances.items():
            tp = TopicPartition(self._topic, partition)
            self._expected[tp] = new
            commit[tp] = new
            m.last_offset.labels(self._topic, str(partition)).set(new - 1)
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                m.lag.labels(self._topic, str(partition)).set(max(0, highwater - new))
        try:
            await self._consumer.commit(commit)
        except KafkaError as exc:  # only lag tools read these; the database is the truth
            log.info("could not commit group offsets (%s); the read model is unaffected", exc)
