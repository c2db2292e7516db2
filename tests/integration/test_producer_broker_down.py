"""The publisher when its broker goes away, on a private real broker this test can stop.

The shared broker must stay up for everyone else, so each test starts its own single-node Kafka
with infra/kafka.sh (own port, own state directory, the same distribution) and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time

import pytest
from aiokafka.errors import LeaderNotAvailableError, NotLeaderForPartitionError

from conntrack.core.events import Event, NodeHeartbeat, NodeStarted
from conntrack.producer.errors import (
    BrokerUnavailableError,
    DeliveryTimeoutError,
    PublisherError,
    UndeliveredEventsError,
)
from conntrack.producer.publisher import Publisher
from conntrack.producer.topics import TopicSpec, ensure_topics
from tests.conftest import PrivateBroker
from tests.support.events import T0
from tests.support.kafka import read_events, unique

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def test_when_the_broker_goes_down_nothing_is_lost_silently(
    private_broker: PrivateBroker,
) -> None:
    await private_broker.up()
    topic = unique("events")
    await ensure_topics(private_broker.bootstrap, [TopicSpec(topic, 1, 1, 1)])
    failed: list[tuple[Event, BaseException]] = []
    pub = Publisher(
        private_broker.bootstrap,
        topic,
        "gw",
        delivery_timeout_s=2,
        max_pending=5,
        activity_interval_s=3600,
        on_undeliverable=lambda event, error: failed.append((event, error)),
    )
    await pub.start()
    delivered = [await pub.connected(f"c{i}", "10.0.0.1", "ua") for i in range(3)]
    await pub.flush()
    assert pub.stats().delivered == 3

    await private_broker.down()

    # Handing events over still works while there is room; the broker just never confirms.
    first = await pub.activity("c0", at_ns=T0)
    assert first is not None
    assert await pub.activity("c0", at_ns=T0 + 5) is None
    with pytest.raises(DeliveryTimeoutError, match="2 event"):
        await pub.flush()  # the merged activity went out too; neither is confirmed
    assert failed == []  # unconfirmed is not yet undeliverable: they stay in flight
    accepted = [await pub.connected(f"d{i}", "10.0.0.2", "ua") for i in range(3)]
    assert pub.stats().in_flight == 5

    # max_pending unconfirmed events: the next one waits for room, then gets a clear error.
    with pytest.raises(BrokerUnavailableError, match="did not take event"):
        await pub.connected("refused", "10.0.0.3", "ua")
    assert [e.connection_id for e, _ in failed] == ["refused"]

    with pytest.raises(UndeliveredEventsError) as stopped:
        await pub.stop()
    assert stopped.value.count == 6
    assert not pub.started
    assert pub.stats().in_flight == 0
    assert pub.undelivered == 6
    reported = [event for event, _ in failed]
    assert len({e.event_id for e in reported}) == 6  # each reported exactly once
    unconfirmed = {e.event_id for e in reported[1:]}
    assert {first.event_id} | {e.event_id for e in accepted} <= unconfirmed
    assert [e.occurred_at_ns for e in reported if e.kind == "activity"] == [T0, T0 + 5]
    assert not {e.event_id for e in delivered} & {e.event_id for e in reported}
    assert all(isinstance(error, DeliveryTimeoutError) for _, error in failed[1:])


async def test_a_short_outage_delays_events_but_loses_none(
    private_broker: PrivateBroker,
) -> None:
    await private_broker.up()
    topic = unique("events")
    await ensure_topics(private_broker.bootstrap, [TopicSpec(topic, 1, 1, 1)])
    failed: list[Event] = []
    async with Publisher(
        private_broker.bootstrap,
        topic,
        "gw",
        delivery_timeout_s=120,
        on_undeliverable=lambda event, _: failed.append(event),
    ) as pub:
        before = await pub.connected("c", "10.0.0.1", "ua", at_ns=T0)
        await pub.flush()
        await private_broker.down()
        during = [await pub.activity("c", at_ns=T0 + 1), await pub.activity("c", at_ns=T0 + 2)]
        await private_broker.up()
        after = await pub.disconnected("c", at_ns=T0 + 3)
        await pub.flush()
    assert failed == []
    assert pub.undelivered == 0
    got = await read_events(private_broker.bootstrap, topic, partitions=1)
    assert [e.occurred_at_ns for e in got] == [T0, T0 + 1, T0 + 2, T0 + 3]
    assert got[0] == before
    assert got[1] == during[0]
    assert got[3] == after


class _Pump:
    """A gateway that keeps publishing: one Activity every few milliseconds, round robin over a
    few connections, each event's time one nanosecond after the previous one's, so the order
    events were handed in can be read back from their times."""

    def __init__(self, pub: Publisher, connections: int = 8) -> None:
        self.pub = pub
        self.connections = connections
        self.handed: list[Event] = []
        self.refused: list[PublisherError] = []
        self.n = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            n, self.n = self.n, self.n + 1
            try:
                event = await self.pub.activity(f"c{n % self.connections}", at_ns=T0 + n)
            except PublisherError as exc:  # waited for room and gave up: reported, counted
                self.refused.append(exc)
            else:
                assert event is not None  # activity_interval_s=0: every call publishes
                self.handed.append(event)
            await asyncio.sleep(0.005)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize("outage_s", [10, 35])
async def test_an_outage_longer_than_the_delivery_timeout_is_survived_by_the_same_publisher(
    private_broker: PrivateBroker, outage_s: float
) -> None:
    """The broker goes down while events keep coming, for longer than delivery_timeout_s, and
    comes back. aiokafka fails the batches whose partition lost its leader for that long: those
    events are reported once each, and everything handed in once the broker is back is
    delivered, in order per connection, by the same Publisher, with no event twice in the
    topic. While the broker is away the process stays nearly idle."""
    await private_broker.up()
    topic = unique("events")
    await ensure_topics(private_broker.bootstrap, [TopicSpec(topic, 3, 1, 1)])
    failed: list[tuple[Event, BaseException]] = []
    delivery_timeout_s = 3
    pub = Publisher(
        private_broker.bootstrap,
        topic,
        "gw",
        delivery_timeout_s=delivery_timeout_s,
        activity_interval_s=0,
        on_undeliverable=lambda event, error: failed.append((event, error)),
    )
    await pub.start()
    pump = _Pump(pub)
    pump.start()
    try:
        await asyncio.sleep(1)
        # Stopped while events are being published, as in production: the partitions lose
        # their leader, which is what makes aiokafka expire batches.
        await private_broker.down()
        wall, cpu = time.monotonic(), _cpu_s()
        await asyncio.sleep(outage_s)
        wall, cpu = time.monotonic() - wall, _cpu_s() - cpu
        during = pump.n
        await private_broker.up()
        back = pump.n
        await asyncio.sleep(5)
    finally:
        await pump.stop()
    # Everything handed in settles: delivered, or reported.
    for _ in range(20):
        try:
            await pub.flush()
            break
        except UndeliveredEventsError:
            pass  # the outage's failures, reported already; the next flush checks what is left
        except DeliveryTimeoutError:
            pass  # still in flight
    await pub.stop()
    print(
        f"outage {wall:.1f} s: process CPU {cpu:.2f} s = {cpu / wall:.1%} of a core; "
        f"handed in {pump.n}, {during} before the outage ended, delivered "
        f"{pub.stats().delivered}, undelivered {pub.undelivered}"
    )

    assert cpu / wall < 0.2, f"{cpu:.2f} s of CPU in a {wall:.1f} s outage"
    assert any(
        isinstance(error, LeaderNotAvailableError | NotLeaderForPartitionError)
        for _, error in failed
    ), "no batch expired: the outage did not exercise what it is meant to"
    reported = [event.event_id for event, _ in failed]
    assert len(reported) == len(set(reported)), "an event was reported twice"
    stats = pub.stats()
    assert stats.delivered + stats.undelivered == pump.n
    assert stats.in_flight == 0

    got = await read_events(private_broker.bootstrap, topic, partitions=3)
    ids = [event.event_id for event in got]
    assert len(ids) == len(set(ids)), "an event is in the topic twice"
    # read_events returns each partition in offset order: each connection's events are in the
    # order they were handed in (their times say it).
    times: dict[str, list[int]] = {}
    for event in got:
        times.setdefault(event.connection_id, []).append(event.occurred_at_ns)
    for connection_id, seen in times.items():
        assert seen == sorted(seen), f"{connection_id} out of order"
    # What was handed in once the broker was back is delivered, all of it.
    after = [event for event in pump.handed if event.occurred_at_ns >= T0 + back]
    assert len(after) > 100
    assert not {e.event_id for e in after} & set(reported)
    assert {e.event_id for e in after} <= set(ids)
    # Not confirmed and in the topic is possible ("undeliverable" means "not confirmed"), but
    # every event handed in is accounted for one way or the other.
    handed = {e.event_id for e in pump.handed} | set(reported)
    assert handed <= set(ids) | set(reported)
    assert len(handed) == pump.n


async def test_stop_while_a_new_producer_waits_for_the_broker_reports_each_event_once(
    private_broker: PrivateBroker,
) -> None:
    """Batches expired and the replacement producer cannot connect yet: stop() still returns
    after delivery_timeout_s, reporting every event not delivered exactly once (those waiting
    for the new producer too), and the Publisher starts again once the broker is back."""
    await private_broker.up()
    topic = unique("events")
    await ensure_topics(private_broker.bootstrap, [TopicSpec(topic, 3, 1, 1)])
    failed: list[Event] = []
    pub = Publisher(
        private_broker.bootstrap,
        topic,
        "gw",
        delivery_timeout_s=2,
        activity_interval_s=0,
        on_undeliverable=lambda event, _: failed.append(event),
    )
    await pub.start()
    pump = _Pump(pub)
    pump.start()
    try:
        await asyncio.sleep(0.5)
        await private_broker.down()
        await asyncio.sleep(8)  # batches expire after 2 s, the old producer is retired by 4 s
    finally:
        await pump.stop()
    assert pub.stats().in_flight > 0  # waiting for a producer that cannot connect
    started = time.monotonic()
    with pytest.raises(UndeliveredEventsError):
        await pub.stop()
    assert time.monotonic() - started < 2 + 5
    stats = pub.stats()
    assert stats.in_flight == 0
    assert stats.delivered + stats.undelivered == pump.n
    assert len({e.event_id for e in failed}) == len(failed) == stats.undelivered

    await private_broker.up()
    await pub.start()
    again = await pub.connected("c0", "10.0.0.1", "ua", at_ns=T0 + pump.n)
    await pub.flush()
    await pub.stop()
    got = await read_events(private_broker.bootstrap, topic, partitions=3)
    assert again in got
    assert len({e.event_id for e in got}) == len(got)


async def test_a_nodes_heartbeats_are_dropped_in_an_outage_and_resume_after_it(
    private_broker: PrivateBroker,
) -> None:
    """With the node role, an outage longer than delivery_timeout_s: heartbeats that cannot go
    out are dropped and counted apart, never reported as undelivered connection events; the
    connection events keep their exact accounting; heartbeats flow again once the broker is
    back, with the same incarnation."""
    await private_broker.up()
    topic = unique("events")
    await ensure_topics(private_broker.bootstrap, [TopicSpec(topic, 3, 1, 1)])
    failed: list[Event] = []
    pub = Publisher(
        private_broker.bootstrap,
        topic,
        "gw",
        delivery_timeout_s=2,
        activity_interval_s=0,
        node_id="node-a",
        heartbeat_interval_s=0.2,
        on_undeliverable=lambda event, _: failed.append(event),
    )
    await pub.start()
    incarnation = pub.incarnation
    pump = _Pump(pub)
    pump.start()
    try:
        await asyncio.sleep(1)
        await private_broker.down()
        await asyncio.sleep(8)
        dropped_in_outage = pub.stats().heartbeats_dropped
        await private_broker.up()
        back_ns = time.time_ns()
        await asyncio.sleep(5)
    finally:
        await pump.stop()
    for _ in range(20):
        try:
            await pub.flush()
            break
        except (UndeliveredEventsError, DeliveryTimeoutError):
            pass
    stats = pub.stats()
    with contextlib.suppress(UndeliveredEventsError):
        await pub.stop()
    final = pub.stats()  # a heartbeat in flight at the snapshot above settles during stop()

    assert dropped_in_outage > 10  # about 40 beats were due; few if any could go out
    assert all(event.connection_id for event in failed), "a node event was reported"
    assert len({e.event_id for e in failed}) == len(failed) == pub.undelivered
    assert stats.delivered + stats.undelivered == pump.n
    assert stats.in_flight == 0

    got = await read_events(private_broker.bootstrap, topic, partitions=3)
    assert len({e.event_id for e in got}) == len(got)
    beats = [e for e in got if isinstance(e.payload, NodeHeartbeat)]
    assert {e.payload for e in beats} == {NodeHeartbeat("node-a", incarnation or 0)}
    assert sum(e.occurred_at_ns >= back_ns for e in beats) >= 5  # flowing again
    # A heartbeat whose acknowledgement came after the next one was due was counted dropped but
    # did reach the topic: each one in the topic is counted, as delivered or as dropped.
    assert final.heartbeats_delivered <= len(beats)
    assert len(beats) <= final.heartbeats_delivered + final.heartbeats_dropped
    assert [e.payload for e in got if isinstance(e.payload, NodeStarted)] == [
        NodeStarted("node-a", incarnation or 0)
    ]


async def test_stop_of_a_node_while_the_broker_is_away_returns_in_time(
    private_broker: PrivateBroker,
) -> None:
    """A heartbeat stuck in the producer does not hold stop() beyond delivery_timeout_s, and is
    not counted among the undelivered connection events."""
    await private_broker.up()
    topic = unique("events")
    await ensure_topics(private_broker.bootstrap, [TopicSpec(topic, 3, 1, 1)])
    failed: list[Event] = []
    pub = Publisher(
        private_broker.bootstrap,
        topic,
        "gw",
        delivery_timeout_s=2,
        node_id="node-b",
        heartbeat_interval_s=0.2,
        on_undeliverable=lambda event, _: failed.append(event),
    )
    await pub.start()
    await pub.connected("c0", "10.0.0.1", "ua")
    await pub.flush()
    await private_broker.down()
    await asyncio.sleep(0.5)  # a heartbeat is handed over and cannot be acknowledged
    pending = await pub.connected("c1", "10.0.0.1", "ua")
    started = time.monotonic()
    with pytest.raises(UndeliveredEventsError) as stopped:
        await pub.stop()
    assert time.monotonic() - started < 2 + 5
    assert stopped.value.count == 1
    assert [e.event_id for e in failed] == [pending.event_id]
    assert pub.stats().heartbeats_dropped >= 1
    await private_broker.up()
