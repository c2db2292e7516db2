"""The projector when its broker goes away mid-run and comes back, on a private real broker
(the shared one must stay up for everyone else): it waits, resumes by itself, and ends with
exactly the fold of everything published, on both backends."""

from __future__ import annotations

import asyncio
import random

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.core.fold import fold
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.producer.topics import TopicSpec, ensure_topics
from conntrack.projector.runner import Projector
from tests.conftest import PrivateBroker
from tests.support.events import as_records, make_events
from tests.support.kafka import publish, unique
from tests.support.projector import running, wait_caught_up

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def test_broker_outage_mid_run_is_waited_out_and_nothing_is_lost_or_doubled(
    private_broker: PrivateBroker, engine: AsyncEngine
) -> None:
    await private_broker.up()
    events_topic, dlq = unique("events"), unique("dlq")
    await ensure_topics(
        private_broker.bootstrap, [TopicSpec(events_topic, 3, 1, 1), TopicSpec(dlq, 1, 1, 1)]
    )
    s = Settings(
        kafka_bootstrap_servers=private_broker.bootstrap,
        events_topic=events_topic,
        dead_letter_topic=dlq,
        consumer_group=unique("group"),
        batch_max_events=200,
        batch_max_wait_ms=50,
        retry_max_backoff_seconds=1,
    )
    rnd = random.Random(21)
    before, after = make_events(rnd, "o", 1500, 300), make_events(rnd, "p", 1500, 300)
    store = ProjectionStore(engine)
    async with running(Projector(s, store)) as projector:
        await publish(s.kafka_bootstrap_servers, events_topic, as_records(before))
        await wait_caught_up(store, s)
        assert await store.all_states() == fold(before)

        await private_broker.down()
        await asyncio.sleep(5)  # the projector polls a dead broker meanwhile; it must not exit
        await private_broker.up()

        await publish(s.kafka_bootstrap_servers, events_topic, as_records(after))
        await wait_caught_up(store, s, within=120)
        assert projector.records_committed >= len(before)
    assert await store.all_states() == fold(before + after)
