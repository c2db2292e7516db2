"""Dead-lettering: a record the projector cannot use is republished, byte for byte, to the
dead-letter topic with headers that say where it came from and why it was rejected."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

from conntrack.core import kafka
from conntrack.core.kafka import KafkaConnection, connection_of

log = logging.getLogger(__name__)

# Provenance headers added to every dead-lettered record (the original headers are kept too).
SOURCE_TOPIC = "dlq.source.topic"
SOURCE_PARTITION = "dlq.source.partition"
SOURCE_OFFSET = "dlq.source.offset"
SOURCE_TIMESTAMP = "dlq.source.timestamp"
ERROR = "dlq.error"


@dataclass(frozen=True, slots=True)
class Rejected:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    error: str

    @classmethod
    def of(cls, record: Any, error: str) -> Rejected:
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
            key=record.key,
            value=record.value,
            headers=tuple(record.headers or ()),
            error=error,
        )

    def dead_letter_headers(self) -> list[tuple[str, bytes]]:
        return [
            *self.headers,
            (SOURCE_TOPIC, self.topic.encode()),
            (SOURCE_PARTITION, str(self.partition).encode()),
            (SOURCE_OFFSET, str(self.offset).encode()),
            (SOURCE_TIMESTAMP, str(self.timestamp_ms).encode()),
            (ERROR, self.error.encode("utf-8", "replace")),
        ]


class DeadLetterPublisher:
    """Publishes rejected records and waits until the broker has them (acks=all): the projector
    only moves past a poison record once its dead letter is durable."""

    def __init__(self, connection: str | KafkaConnection, topic: str) -> None:
        self._topic = topic
        self._connection = connection_of(connection, "projector")
        self._producer = AIOKafkaProducer(
            **self._connection.options(), acks="all", enable_idempotence=True
        )
        self._started = False

    async def start(self) -> None:
        if not self._started:
            try:
                await kafka.start(self._producer, self._connection)
            except BaseException:
                await self._producer.stop()  # releases what a failed start left behind
                raise
            self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._producer.stop()

    async def publish(self, rejected: list[Rejected]) -> None:
        """Publish the records and wait for every acknowledgement; each is then logged once."""
        futures = [
            await self._producer.send(
                self._topic, value=r.value, key=r.key, headers=r.dead_letter_headers()
            )
            for r in rejected
        ]
        for fut in futures:
            await fut
        for r in rejected:
            log.warning(
                "event=dead_lettered topic=%s partition=%d offset=%d error=%r",
                r.topic,
                r.partition,
                r.offset,
                r.error,
            )
