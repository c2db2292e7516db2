"""Bounded reads of the event log, outside any consumer group (replays must not disturb the
projector's group, and must stop at a known end rather than wait for new events)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from conntrack.core import aiokafka_internals, kafka
from conntrack.core.kafka import KafkaConnection, connection_of
from conntrack.producer.topics import describe_topic_configs

# partition -> [start, end) offsets
Bounds = Mapping[int, tuple[int, int]]


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (Java and aiokafka alike) maps a key to."""
    all_parts = list(range(partitions))
    return int(DefaultPartitioner()(key, all_parts, all_parts))


class TopicNotFoundError(LookupError):
    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic} does not exist")
        self.topic = topic


class LogReader:
    """Async context manager over one topic of the log."""

    def __init__(
        self, servers: str | KafkaConnection, topic: str, *, fetch_max_bytes: int = 16 << 20
    ):
        self.topic = topic
        self._connection = connection_of(servers, "audit")
        self._consumer = AIOKafkaConsumer(
            **self._connection.options(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=fetch_max_bytes,
            max_partition_fetch_bytes=fetch_max_bytes,
        )

    async def __aenter__(self) -> LogReader:
        try:
            await kafka.start(self._consumer, self._connection)
        except BaseException:
            await self._consumer.stop()  # a failed start leaves its client open otherwise
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def timestamp_type(self) -> str:
        """The topic's message.timestamp.type: LogAppendTime (the broker's clock, when the log
        took the record) or CreateTime (the producer's, here the gateways' clocks)."""
        admin = AIOKafkaAdminClient(**self._connection.options())
        await kafka.start(admin, self._connection)
        try:
            configs = await describe_topic_configs(admin, self.topic)
        finally:
            await admin.close()
        return configs.get("message.timestamp.type", "CreateTime")

    async def partitions(self) -> list[int]:
        parts = await aiokafka_internals.topic_partitions(self._consumer, self.topic)
        if not parts:
            raise TopicNotFoundError(self.topic)
        return sorted(parts)

    def _tps(self, partitions: list[int]) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in partitions]

    async def beginning(self, partitions: list[int]) -> dict[int, int]:
        got = await self._consumer.beginning_offsets(self._tps(partitions))
        return {tp.partition: int(o) for tp, o in got.items()}

    async def end(self, partitions: list[int]) -> dict[int, int]:
        got = await self._consumer.end_offsets(self._tps(partitions))
        return {tp.partition: int(o) for tp, o in got.items()}

    async def offsets_at(self, partitions: list[int], timestamp_ms: int) -> dict[int, int]:
        """Per partition, the first offset whose log timestamp is >= timestamp_ms (the log end
        when there is none): cutting there keeps exactly what the log held before that time."""
        got = await self._consumer.offsets_for_times(
            {tp: timestamp_ms for tp in self._tps(partitions)}
        )
        ends = await self.end(partitions)
        return {
            tp.partition: (int(found.offset) if found is not None else ends[tp.partition])
            for tp, found in got.items()
        }

    async def full_bounds(self, partitions: list[int] | None = None) -> dict[int, tuple[int, int]]:
        parts = partitions if partitions is not None else await self.partitions()
        start, end = await self.beginning(parts), await self.end(parts)
        return {p: (start[p], end[p]) for p in parts}

    async def read(self, bounds: Bounds, *, max_records: int = 10_000) -> AsyncIterator[list[Any]]:
        """Yield batches of records of each partition's [start, end), in offset order within a
        partition. Stops when every partition reached its end."""
        todo = {p: (s, e) for p, (s, e) in bounds.items() if e > s}
        if not todo:
            return
        tps = self._tps(sorted(todo))
        self._consumer.assign(tps)
        for tp in tps:
            self._consumer.seek(tp, todo[tp.partition][0])
        remaining = set(tps)
        while remaining:
            batch = await self._consumer.getmany(
                *remaining, timeout_ms=1000, max_records=max_records
            )
            out: list[Any] = []
            for tp, records in batch.items():
                end = todo[tp.partition][1]
                out.extend(r for r in records if r.offset < end)
                if records and records[-1].offset >= end - 1:
                    remaining.discard(tp)
            for tp in list(remaining):
                # A deleted or compacted range can end before `end`; the position says so.
                if await self._consumer.position(tp) >= todo[tp.partition][1]:
                    remaining.discard(tp)
            if out:
                yield out
        # Paused, not unsubscribed: the fetcher has nothing more to prefetch, and its
        # assignment stays active. (aiokafka 0.14 can swallow the cancellation of its fetch
        # task when the consumer is stopped just after an unsubscribe, and stop() then hangs.)
        self._consumer.pause(*tps)
