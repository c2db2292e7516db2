"""Talking to the real broker: topics, publishing, reading back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from conntrack.core.events import (
    Event,
    decode,
)
from tests.support.events import Record


async def publish(bootstrap: str, topic: str, records: Sequence[Record]) -> list[Any]:
    """Publish and wait until the broker has all of them; returns their RecordMetadata."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v, headers=h) for k, v, h in records]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


async def _partitions(bootstrap: str, topic: str) -> list[int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (description,) = await admin.describe_topics([topic])
        return [int(p["partition"]) for p in description["partitions"]]
    finally:
        await admin.close()


async def log_end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    # aiokafka's group-less consumer raises CancelledError from stop() if its background task
    # has not run once yet; let it.
    await asyncio.sleep(0.01)
    try:
        partitions = await _partitions(bootstrap, topic)
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: int(o) for tp, o in ends.items()}
    finally:
        await consumer.stop()


async def publish_stream(
    bootstrap: str, topic: str, records: Sequence[Record], bursts: int = 30, pause: float = 0.05
) -> None:
    """Publish in bursts with pauses, so a projector is still busy when a test kills it."""
    step = max(1, len(records) // bursts)
    for i in range(0, len(records), step):
        await publish(bootstrap, topic, records[i : i + step])
        await asyncio.sleep(pause)


async def read_dead_letters(bootstrap: str, topic: str, n: int) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(30):
            while len(out) < n:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    out.extend(records)
        # Nothing beyond the n expected.
        extra = await consumer.getmany(timeout_ms=1000)
        out.extend(r for records in extra.values() for r in records)
    finally:
        await consumer.stop()
    return out


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def create_topic(bootstrap: str, name: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


async def read_all(bootstrap: str, topic: str, partitions: int = 3) -> list[Any]:
    """Every record of the topic, up to its current end (call after a successful flush).
    The kafka_settings fixture's events topic has 3 partitions."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: list[Any] = []
        deadline = time.monotonic() + 30
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            assert time.monotonic() < deadline, "records did not arrive within 30 s"
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def read_events(bootstrap: str, topic: str, partitions: int = 3) -> list[Event]:
    return [decode(r.value, r.key) for r in await read_all(bootstrap, topic, partitions)]


async def create_raw(bootstrap: str, name: str, configs: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(name, 2, 1, topic_configs=configs)])
        assert [e[1] for e in response.topic_errors] == [0]
    finally:
        await admin.close()
