"""Which partitions of the events topic this process owns, and where their reads stand.

Positions live in the read-model database, not in Kafka: on partition assignment the consumer
seeks to the stored positions ("Storing Offsets Outside Kafka" in the aiokafka docs). Every seek
of the projector goes through here and gets a stamp, so that fetched records can be matched to
the read they came from (projector/continuity.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from conntrack.core.retry import Abandoned, Retrier
from conntrack.core.store import ProjectionStore
from conntrack.projector.metrics import ProjectorMetrics

log = logging.getLogger(__name__)

# How long a partition may stay assigned without a stored position before the loop seeks it.
STRAGGLER_GRACE_S = 5.0


class Partitions:
    def __init__(
        self,
        topic: str,
        store: ProjectionStore,
        metrics: ProjectorMetrics,
        retry: Retrier,
    ) -> None:
        self.topic = topic
        self._store = store
        self._metrics = metrics
        self._retry = retry
        self.consumer: AIOKafkaConsumer | None = None  # set by whoever creates the consumer
        # Stored next offset of each partition this process owns, as it last read or wrote it.
        self.positions: dict[TopicPartition, int] = {}
        self._assigning = 0  # assignment listener calls in progress
        self._unpositioned_since: dict[TopicPartition, float] = {}
        # Every seek gets a stamp; records are applied only under the stamp of the partition's
        # latest seek, whose offset is kept to tell Kafka's unused offsets from a gap.
        self._seeks = 0
        self._sought: dict[TopicPartition, tuple[int, int]] = {}  # tp -> (stamp, offset)
        self.on_revoked: list[Callable[[list[TopicPartition]], None]] = []

    def _consumer(self) -> AIOKafkaConsumer:
        assert self.consumer is not None
        return self.consumer

    def listener(self) -> ConsumerRebalanceListener:
        return _SeekToStored(self)

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer().assignment())

    # Seeking

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Position a partition's reads (every seek of this process goes through here)."""
        self._seeks += 1
        self._sought[tp] = (self._seeks, offset)
        self._consumer().seek(tp, offset)

    def stamp(self, tp: TopicPartition) -> int:
        return self._sought.get(tp, (0, 0))[0]

    def sought(self, tp: TopicPartition) -> tuple[int, int] | None:
        """(stamp, offset) of the partition's latest seek."""
        return self._sought.get(tp)

    async def seek_to_stored(self, assigned: list[TopicPartition]) -> None:
        mine = [tp for tp in assigned if tp.topic == self.topic]
        if not mine:
            return
        try:
            positions = await self._retry(
                "database",
                lambda: self._store.positions(self.topic, [tp.partition for tp in mine]),
            )
        except Abandoned:
            return  # stopping; the partitions stay unpositioned and their records are skipped
        owned = self.assignment()
        for tp in mine:
            if tp in owned:
                self.seek(tp, positions[tp.partition])
                self.positions[tp] = positions[tp.partition]
        self._metrics.assigned.set(len(self.positions))
        log.info(
            "event=assigned topic=%s positions=%s",
            self.topic,
            ",".join(f"{p}:{o}" for p, o in sorted(positions.items())),
        )

    def rewind(self, partitions: list[int]) -> None:
        """Seek these partitions, where still owned, back to their positions: their records
        are read again."""
        owned = self.assignment()
        for p in partitions:
            tp = TopicPartition(self.topic, p)
            position = self.positions.get(tp)
            if tp in owned and position is not None:
                self.seek(tp, position)

    async def position_stragglers(self) -> None:
        """Seek partitions that stayed assigned without a stored position: the assignment
        listener failed (aiokafka only logs its errors), and nothing of them would be applied.
        A grace period keeps this from racing a listener that is merely slow (two seeks from
        reads at different times would cost a fenced batch)."""
        now = time.monotonic()
        since = self._unpositioned_since
        assigned = self.assignment()
        for tp in [tp for tp in since if tp not in assigned or tp in self.positions]:
            del since[tp]
        unpositioned = [
            tp for tp in assigned if tp.topic == self.topic and tp not in self.positions
        ]
        late = [
            tp
            for tp in unpositioned
            if now - since.setdefault(tp, now) >= STRAGGLER_GRACE_S and not self._assigning
        ]
        if late:
            log.warning("event=positioning_late partitions=%s", sorted(t.partition for t in late))
            await self.seek_to_stored(late)

    # Ownership

    def forget(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            if self.positions.pop(tp, None) is not None:
                labels = (tp.topic, str(tp.partition))
                for gauge in (self._metrics.lag, self._metrics.last_offset):
                    with contextlib.suppress(KeyError):
                        gauge.remove(*labels)
        for callback in self.on_revoked:
            callback(revoked)
        self._metrics.assigned.set(len(self.positions))
        if revoked:
            log.info("event=revoked partitions=%s", sorted(tp.partition for tp in revoked))

    def advanced(self, partition: int, new: int) -> TopicPartition | None:
        """Record a committed advance; returns the partition if this process still owns it
        (it may have been revoked while the batch was written: committed under the fence, but
        no longer ours to track)."""
        tp = TopicPartition(self.topic, partition)
        if tp not in self.positions:
            return None
        self.positions[tp] = new
        self._metrics.last_offset.labels(self.topic, str(partition)).set(new - 1)
        return tp

    def update_lag(self) -> None:
        consumer = self._consumer()
        assigned = consumer.assignment()
        for tp, applied in self.positions.items():
            if tp not in assigned:
                continue  # being revoked right now; the listener will forget it
            highwater = consumer.highwater(tp)
            if highwater is not None:
                self._metrics.lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - applied)
                )


class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, partitions: Partitions) -> None:
        self._partitions = partitions

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self._partitions.forget(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._partitions._assigning += 1
        try:
            await self._partitions.seek_to_stored(list(assigned))
        finally:
            self._partitions._assigning -= 1
