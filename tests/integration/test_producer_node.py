"""The publisher's node role on the real broker: NodeStarted, node fields, heartbeats."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import uuid
from typing import Any

import pytest

from conntrack.core.events import (
    HEADERS,
    Connected,
    Event,
    InvalidEvent,
    NodeHeartbeat,
    NodeStarted,
    decode_record,
    record_key,
)
from conntrack.core.settings import Settings
from conntrack.producer.publisher import Publisher
from tests.support.kafka import read_all

pytestmark = [pytest.mark.kafka]

SECOND = 1_000_000_000


def publisher(settings: Settings, **options: Any) -> Publisher:
    return Publisher(settings.kafka_bootstrap_servers, settings.events_topic, "gw-node", **options)


async def read_back(settings: Settings) -> list[tuple[Any, Event]]:
    """Every record of the topic with its decoded event, sorted by event time."""
    records = await read_all(settings.kafka_bootstrap_servers, settings.events_topic)
    pairs = []
    for record in records:
        event = decode_record(record.value, record.key)
        assert record.key == record_key(event)
        assert tuple(record.headers) == HEADERS
        pairs.append((record, event))
    return sorted(pairs, key=lambda p: p[1].occurred_at_ns)


def node_events(pairs: list[tuple[Any, Event]]) -> list[Event]:
    return [e for _, e in pairs if isinstance(e.payload, NodeStarted | NodeHeartbeat)]


async def test_a_node_announces_its_start_stamps_its_connections_and_beats(
    kafka_settings: Settings,
) -> None:
    node = f"node-{uuid.uuid4().hex[:8]}"
    async with publisher(kafka_settings, node_id=node, heartbeat_interval_s=0.2) as pub:
        assert pub.node_id == node
        incarnation = pub.incarnation
        assert incarnation is not None
        # start() returned: NodeStarted is acknowledged before any connection event exists.
        a = await pub.connected("c-1", "10.0.0.1", "ua/1")
        b = await pub.connected("c-2", "10.0.0.2", "ua/2")
        await pub.activity("c-1")
        await pub.disconnected("c-2")
        await asyncio.sleep(1.1)
        await pub.flush()
        stats = pub.stats()
    final = pub.stats()  # a heartbeat in flight at the snapshot above settles on exit
    assert a.payload == Connected("10.0.0.1", "ua/1", node, incarnation)
    assert b.payload == Connected("10.0.0.2", "ua/2", node, incarnation)
    # The connection accounting counts connection events only.
    assert stats.delivered == 4
    assert stats.undelivered == 0

    pairs = await read_back(kafka_settings)
    events = [e for _, e in pairs]
    assert isinstance(events[0].payload, NodeStarted)  # the first event in time
    assert events[0].payload == NodeStarted(node, incarnation)
    assert events[0].connection_id == ""
    assert events[0].gateway_id == "gw-node"
    for record, event in pairs:
        if isinstance(event.payload, NodeStarted | NodeHeartbeat):
            assert record.key == node.encode()
    connected = [e for e in events if isinstance(e.payload, Connected)]
    assert connected == [a, b]
    assert [e.kind for e in events if e.connection_id] == [
        "connected",
        "connected",
        "activity",
        "disconnected",
    ]

    beats = [e for e in node_events(pairs) if isinstance(e.payload, NodeHeartbeat)]
    assert {e.payload for e in beats} == {NodeHeartbeat(node, incarnation)}
    assert beats[0].occurred_at_ns > events[0].occurred_at_ns
    # About 1.1 s at 0.2 s apart: 5 of them, give or take a slow machine.
    assert 3 <= len(beats) <= 7, [e.occurred_at_ns for e in beats]
    gaps = [(y.occurred_at_ns - x.occurred_at_ns) / SECOND for x, y in itertools.pairwise(beats)]
    assert 0.15 <= statistics.median(gaps) <= 0.3, gaps
    # Each heartbeat in the topic is counted: as delivered, or (its acknowledgement later than
    # the next beat was due, on a slow machine) as dropped.
    assert final.heartbeats_delivered <= len(beats)
    assert len(beats) <= final.heartbeats_delivered + final.heartbeats_dropped
    assert final.heartbeats_dropped <= 2
    assert len({e.event_id for e in events}) == len(events)


async def test_each_start_of_a_node_has_a_larger_incarnation(kafka_settings: Settings) -> None:
    node = f"node-{uuid.uuid4().hex[:8]}"
    first = publisher(kafka_settings, node_id=node, heartbeat_interval_s=60)
    await first.start()
    one = first.incarnation
    await first.stop()
    assert first.incarnation == one  # kept after stop

    second = publisher(kafka_settings, node_id=node, heartbeat_interval_s=60)  # a new instance
    async with second:
        two = second.incarnation
        c = await second.connected("c-1", "10.0.0.1", "ua")
    # The same instance started again is a new start too.
    await first.start()
    three = first.incarnation
    await first.stop()
    assert one is not None
    assert two is not None
    assert three is not None
    assert one < two < three
    assert c.payload == Connected("10.0.0.1", "ua", node, two)

    started = [e.payload for e in node_events(await read_back(kafka_settings))]
    assert started == [
        NodeStarted(node, one),
        NodeStarted(node, two),
        NodeStarted(node, three),
    ]


async def test_without_a_node_id_nothing_changes(kafka_settings: Settings) -> None:
    async with publisher(kafka_settings, heartbeat_interval_s=0.05) as pub:
        assert pub.node_id is None
        assert pub.incarnation is None
        a = await pub.connected("c-1", "10.0.0.1", "ua")
        await asyncio.sleep(0.3)
        stats = pub.stats()
    assert a.payload == Connected("10.0.0.1", "ua")
    assert a.payload.node_id == ""
    assert a.payload.node_incarnation == 0
    assert stats.heartbeats_delivered == stats.heartbeats_dropped == 0
    pairs = await read_back(kafka_settings)
    assert [e for _, e in pairs] == [a]
    assert pairs[0][0].key == b"c-1"


async def test_heartbeats_do_not_wait_for_connection_events(kafka_settings: Settings) -> None:
    """Connection events queue in their partition's lane (and behind max_pending); heartbeats
    go around both."""
    node = f"node-{uuid.uuid4().hex[:8]}"
    async with publisher(kafka_settings, node_id=node, heartbeat_interval_s=0.1) as pub:
        lane = pub._handover.lanes.lane_of("c-1")
        assert pub._handover.lanes.reserve(lane) is None  # c-1's partition waits for this turn now
        try:
            blocked = asyncio.create_task(pub.connected("c-1", "10.0.0.1", "ua"))
            before = pub.stats().heartbeats_delivered
            await asyncio.sleep(0.6)
            during = pub.stats().heartbeats_delivered - before
            assert not blocked.done()
        finally:
            pub._handover.lanes.release(lane)
        await blocked
    assert during >= 3


async def test_publish_refuses_a_nodes_own_events(kafka_settings: Settings) -> None:
    node = f"node-{uuid.uuid4().hex[:8]}"
    async with publisher(kafka_settings, node_id=node, heartbeat_interval_s=60) as pub:
        assert pub.incarnation is not None
        for payload in (NodeStarted(node, pub.incarnation), NodeHeartbeat(node, pub.incarnation)):
            event = Event(str(uuid.uuid4()), "", "gw-node", 1_700_000_000 * SECOND, payload)
            with pytest.raises(InvalidEvent, match="node role"):
                await pub.publish(event)
        assert pub.stats().undelivered == 0
