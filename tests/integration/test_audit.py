"""Replay and audit on the real broker: history, point-in-time state, verify."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.audit.log import LogReader, partition_for_key
from conntrack.audit.replay import fold_until, history, state_of, verify
from conntrack.core.events import Connected, Event, encode
from conntrack.core.fold import fold
from conntrack.core.schema import connection_labels, connections
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.producer.publisher import Publisher
from conntrack.producer.simulator import Workload, generate
from conntrack.projector.runner import Projector
from tests.support.kafka import create_raw, delete_topics, unique

pytestmark = [pytest.mark.kafka]


async def publish(settings: Settings, events: list[Event]) -> None:
    async with Publisher(settings.kafka_bootstrap_servers, settings.events_topic, "audit") as pub:
        for event in events:
            await pub.publish(event)
        await pub.flush()


async def test_history_lists_exactly_one_connections_events_in_order(
    kafka_settings: Settings,
) -> None:
    events = list(generate(Workload(connections=30, activities_per_connection=4, seed=7)))
    await publish(kafka_settings, events)
    target = events[40].connection_id
    expected = [e for e in events if e.connection_id == target]
    async with LogReader(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic) as r:
        entries = [e async for e in history(r, target)]
        assert [e.event for e in entries] == expected
        assert {e.partition for e in entries} == {partition_for_key(target.encode(), 3)}
        assert [e.offset for e in entries] == sorted(e.offset for e in entries)
        assert await state_of(r, target) == fold(expected)[target]
        assert [e async for e in history(r, "no-such-connection")] == []


async def test_state_as_of_a_moment_equals_a_fold_of_the_events_before_it(
    kafka_settings: Settings,
) -> None:
    before = list(generate(Workload(connections=40, seed=1)))
    after = list(generate(Workload(connections=40, seed=2)))
    await publish(kafka_settings, before)
    await asyncio.sleep(0.05)  # log timestamps have millisecond resolution
    cut_ms = int(time.time() * 1000)
    await asyncio.sleep(0.05)
    await publish(kafka_settings, after)
    async with LogReader(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic) as r:
        as_of = await fold_until(r, cut_ms)
        everything = await fold_until(r, int(time.time() * 1000) + 60_000)
        one = before[0].connection_id
        assert await state_of(r, one, until_ms=cut_ms) == fold(before)[one]
    assert as_of.states == fold(before)
    assert as_of.events == len(before)
    assert everything.states == fold(before + after)


async def test_verify_passes_on_a_live_projection_and_reports_a_row_altered_behind_its_back(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    events = list(generate(Workload(connections=60, seed=3, principals=7)))
    await publish(kafka_settings, events)
    # A valid event without a key: the projector dead-letters it, so a replay must leave it out
    # too (it would otherwise be a connection the fold has and the live projection has not).
    keyless = Event("keyless-e", "keyless-c", "gw", events[0].occurred_at_ns, Connected("::1", "u"))
    async with AIOKafkaProducer(bootstrap_servers=kafka_settings.kafka_bootstrap_servers) as raw:
        await raw.send_and_wait(kafka_settings.events_topic, encode(keyless), key=None)
    events_and_keyless = len(events) + 1
    store = ProjectionStore(engine)
    async with Projector(kafka_settings, store) as projector:
        task = asyncio.create_task(projector.run())
        for _ in range(300):
            positions = await store.all_positions()
            if sum(positions.values()) >= events_and_keyless:
                break
            await asyncio.sleep(0.1)
        await projector.stop()
        await asyncio.wait_for(task, 30)

    async with LogReader(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic) as r:
        result = await verify(engine, r)
        assert result.ok, result.differences[:3]
        assert result.compared == len({e.connection_id for e in events})

        victim = events[0].connection_id
        async with engine.begin() as conn:
            await conn.execute(
                update(connections)
                .where(connections.c.connection_id == victim)
                .values(source_ip="203.0.113.66")
            )
        result = await verify(engine, r)
    assert not result.ok
    assert result.pruned == 0
    assert [d.connection_id for d in result.differences] == [victim]
    assert result.differences[0].live is not None
    assert result.differences[0].live.source_ip == "203.0.113.66"
    assert result.label_index_differences == []

    # The label index is checked too: a row for a label the connection does not have.
    open_labelled = min(
        cid for cid, s in fold(events).items() if s.is_open and s.labels and cid != victim
    )
    async with engine.begin() as conn:
        await conn.execute(
            update(connection_labels)
            .where(connection_labels.c.connection_id == open_labelled)
            .values(value="forged")
        )
    async with LogReader(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic) as r:
        result = await verify(engine, r)
    assert result.label_index_differences == [open_labelled]


async def test_verify_expects_connections_pruned_by_retention_to_be_absent(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    events = list(generate(Workload(connections=40, seed=4)))
    await publish(kafka_settings, events)
    store = ProjectionStore(engine)
    async with Projector(kafka_settings, store) as projector:
        task = asyncio.create_task(projector.run())
        for _ in range(300):
            if sum((await store.all_positions()).values()) >= len(events):
                break
            await asyncio.sleep(0.1)
        await projector.stop()
        await asyncio.wait_for(task, 30)
    disconnected = {e.connection_id for e in events if e.kind == "disconnected"}
    assert disconnected
    while (await store.prune(time.time_ns() + 10**12, None)).pruned:
        pass
    assert await store.count() == len({e.connection_id for e in events}) - len(disconnected)

    async with LogReader(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic) as r:
        result = await verify(engine, r)
    assert result.ok, result.differences[:3]
    assert result.pruned == len(disconnected)


async def test_as_of_on_a_log_append_time_topic_cuts_exactly_at_what_the_log_held(
    kafka_settings: Settings,
) -> None:
    """Gateways' clocks may be anywhere: events that claim to come from tomorrow were appended
    before the cut, events that claim to be a day old after it. As-of follows the log."""
    topic = unique("events-lat")
    await create_raw(
        kafka_settings.kafka_bootstrap_servers,
        topic,
        {"message.timestamp.type": "LogAppendTime", "retention.ms": "-1"},
    )
    day_ms = 86_400_000
    now = time.time_ns()
    before = [
        Event(f"b{i}", f"c{i}", "gw", now + day_ms * 1_000_000, Connected("10.0.0.1", "ua"))
        for i in range(20)
    ]
    after = [
        Event(f"a{i}", f"c{i}", "gw", now - day_ms * 1_000_000, Connected("10.0.0.2", "ua"))
        for i in range(20)
    ]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        for e in before:  # stamped by the gateway a day ahead: the log restamps them
            await producer.send_and_wait(
                topic,
                encode(e),
                key=e.connection_id.encode(),
                timestamp_ms=int(time.time() * 1000) + day_ms,
            )
        await asyncio.sleep(0.05)  # log timestamps have millisecond resolution
        cut_ms = int(time.time() * 1000)
        await asyncio.sleep(0.05)
        for e in after:
            await producer.send_and_wait(
                topic,
                encode(e),
                key=e.connection_id.encode(),
                timestamp_ms=int(time.time() * 1000) - day_ms,
            )
    finally:
        await producer.stop()
    try:
        async with LogReader(kafka_settings.kafka_bootstrap_servers, topic) as r:
            assert await r.timestamp_type() == "LogAppendTime"
            as_of = await fold_until(r, cut_ms)
        assert as_of.states == fold(before)
        assert as_of.events == len(before)
    finally:
        await delete_topics(kafka_settings.kafka_bootstrap_servers, [topic])
