"""The Publisher's parts that talk to Kafka, each on its own against the real broker: the node
role (NodeStarted, then heartbeats), the producer slot (a replacement takes over and delivers
what waited, in order) and the activity part (merged calls, what drains)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from conntrack.core.events import MIN_TIME_NS, Activity, Event, NodeHeartbeat, NodeStarted, encode
from conntrack.core.kafka import connection_of
from conntrack.core.settings import Settings
from conntrack.producer import kafka_producer
from conntrack.producer.activity import ActivityPublishing
from conntrack.producer.handover import Handover
from conntrack.producer.lanes import Lanes
from conntrack.producer.ledger import Future, Ledger, Record
from conntrack.producer.node_role import NodeRole
from conntrack.producer.outcomes import Outcomes
from conntrack.producer.replacement import ProducerSlot
from tests.support.kafka import read_events

pytestmark = [pytest.mark.kafka]

TIMEOUT_S = 10.0


class Parts:
    """A ledger, outcomes, a handover and a producer slot wired as the Publisher wires them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection = connection_of(settings.kafka_bootstrap_servers, "test")
        self.options = kafka_producer.options(0, TIMEOUT_S, {})
        self.ledger = Ledger(100)
        self.outcomes = Outcomes(None)
        self.handover = Handover(
            ledger=self.ledger,
            outcomes=self.outcomes,
            spooling=None,
            topic=settings.events_topic,
            delivery_timeout_s=TIMEOUT_S,
        )
        self.slot = ProducerSlot(
            connect=self.connect,
            ledger=self.ledger,
            topic=settings.events_topic,
            partition_of=self.handover.partition_of,
            delivery_timeout_s=TIMEOUT_S,
            accepting=lambda: True,
            degrade=self.handover.degrade,
            also_carried=list,
            abandon=self.handover.abandon,
        )
        self.handover.attach(self.slot)

    async def connect(self, retry_log_level: int = logging.WARNING) -> object:
        return await kafka_producer.connect(
            self.connection,
            self.options,
            self.settings.events_topic,
            deadline=asyncio.get_running_loop().time() + TIMEOUT_S,
            timeout_s=TIMEOUT_S,
            retry_log_level=retry_log_level,
        )


@pytest.fixture
async def parts(kafka_settings: Settings) -> AsyncIterator[Parts]:
    wired = Parts(kafka_settings)
    producer = await wired.connect()
    wired.handover.lanes = Lanes(
        kafka_producer.partition_count(producer, kafka_settings.events_topic)
    )
    wired.slot.producer = producer
    yield wired
    held = await wired.slot.take()
    if held is not None:
        await held.stop()


async def test_the_node_role_announces_its_start_then_beats(parts: Parts) -> None:
    node = NodeRole(
        "node-a",
        "gw",
        parts.settings.events_topic,
        heartbeat_interval_s=0.1,
        delivery_timeout_s=TIMEOUT_S,
        wall_clock_ns=lambda: MIN_TIME_NS + 10**9,
    )
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    await node.announce_start(parts.slot.producer, deadline)
    assert node.incarnation is not None
    node.start(parts.slot)
    await asyncio.sleep(0.6)
    await node.stop()
    await node.wait(asyncio.get_running_loop().time() + TIMEOUT_S)
    assert node.delivered >= 3
    assert node.dropped == 0
    events = await read_events(parts.settings.kafka_bootstrap_servers, parts.settings.events_topic)
    payloads = [e.payload for e in events]
    assert payloads[0] == NodeStarted("node-a", node.incarnation)
    assert all(p == NodeHeartbeat("node-a", node.incarnation) for p in payloads[1:])
    assert len(payloads) - 1 == node.delivered


async def test_a_replacement_producer_delivers_what_waited_in_order(parts: Parts) -> None:
    first = parts.slot.producer
    parts.slot.replace_soon()
    assert parts.slot.replacing
    events = [Event(f"e{i}", "c1", "gw", MIN_TIME_NS + i, Activity(1)) for i in range(5)]
    parked: list[Future] = []
    for event in events:
        future = parts.ledger.park(Record(event, encode(event)))
        parked.append(future)
    while parts.slot.replacing:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert parts.slot.producer is not None
    assert parts.slot.producer is not first
    await asyncio.wait_for(asyncio.gather(*parked), TIMEOUT_S)
    got = await read_events(parts.settings.kafka_bootstrap_servers, parts.settings.events_topic)
    assert [e.event_id for e in got] == [e.event_id for e in events]


async def test_activity_merges_within_its_interval_and_drains_the_rest(parts: Parts) -> None:
    now = [0]
    activity = ActivityPublishing(
        3600.0,  # an hour of the test's clock: nothing falls due by itself
        handover=parts.handover,
        make_event=lambda cid, payload, at: Event(f"{cid}-{at}", cid, "gw", at or 0, payload),
        monotonic_ns=lambda: now[0],
        wall_clock_ns=lambda: MIN_TIME_NS,
        delivery_timeout_s=TIMEOUT_S,
    )
    first = await activity.record("c1", 1, MIN_TIME_NS + 1)
    assert first is not None  # the first activity goes out at once
    for step in range(2, 5):
        now[0] = step
        assert await activity.record("c1", 2, MIN_TIME_NS + step) is None
    assert (activity.coalesced, activity.pending) == (3, 1)
    (merged,) = activity.drain()
    assert merged.payload == Activity(6)
    assert merged.occurred_at_ns == MIN_TIME_NS + 4
    await parts.handover.send_in_lanes([merged], asyncio.get_running_loop().time() + TIMEOUT_S)
    await parts.ledger.wait(asyncio.get_running_loop().time() + TIMEOUT_S)
    assert parts.outcomes.delivered == 2
    got = await read_events(parts.settings.kafka_bootstrap_servers, parts.settings.events_topic)
    assert [e.payload for e in got] == [Activity(1), Activity(6)]
