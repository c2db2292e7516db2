"""Reading the lifecycle stream from its beginning, as a downstream consumer (or a test, or the
benchmark) does without a consumer group: every partition of the topic, waited for while the
role is still creating it, assigned and sought to its start."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from conntrack.core import aiokafka_internals


async def partitions_of(
    consumer: AIOKafkaConsumer, topic: str, within_s: float = 10.0
) -> list[TopicPartition]:
    """The topic's partitions, from fresh metadata, waiting up to within_s for a topic that
    does not exist yet (TimeoutError after that)."""
    async with asyncio.timeout(within_s):
        while True:
            parts = await aiokafka_internals.topic_partitions(consumer, topic)
            if parts:
                return [TopicPartition(topic, p) for p in sorted(parts)]
            await asyncio.sleep(0.1)  # no event to wait on: the broker is asked again


async def assign_from_beginning(
    consumer: AIOKafkaConsumer, topic: str, within_s: float = 10.0
) -> list[TopicPartition]:
    """Assign the started consumer every partition of the topic, each from its beginning."""
    tps = await partitions_of(consumer, topic, within_s)
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return tps
