"""Events compressed with any of Kafka's codecs are applied: a gateway of another make may
compress its batches (franz-go and librdkafka-based clients default to snappy or lz4), and a
codec the projector could not read would stall its partitions for good."""

from __future__ import annotations

import random

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.projector.runner import Projector
from tests.support.events import as_records, make_events
from tests.support.projector import assert_matches_fold, running, wait_caught_up

pytestmark = [pytest.mark.kafka]


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_events_of_every_codec_are_applied(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    events = make_events(random.Random(7), "codec", 80, 20)
    for n, codec in enumerate(("gzip", "snappy", "lz4", "zstd")):
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka_settings.kafka_bootstrap_servers,
            acks="all",
            compression_type=codec,
            linger_ms=20,  # whole batches of several records, each compressed as one
        )
        await producer.start()
        try:
            futures = [
                await producer.send(kafka_settings.events_topic, key=k, value=v, headers=h)
                for k, v, h in as_records(events[n * 20 : (n + 1) * 20])
            ]
            for future in futures:
                await future
        finally:
            await producer.stop()
    store = ProjectionStore(engine)
    async with running(Projector(kafka_settings, store)):
        await wait_caught_up(store, kafka_settings)
    await assert_matches_fold(store, events)
