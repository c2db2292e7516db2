"""The publisher when its broker goes away, on a private real broker this test can stop.

The shared broker must stay up for everyone else, so each test starts its own single-node Kafka
with infra/kafka.sh (own port, own state directory, the same distribution) and stops it.
"""

from __future__ import annotations

import pytest

from connection_tracker.events import Event
from producer.errors import (
    BrokerUnavailableError,
    DeliveryTimeoutError,
    UndeliveredEventsError,
)
from producer.publisher import Publisher
from producer.topics import TopicSpec, ensure_topics
from tests.conftest import PrivateBroker, unique
from tests.integration.test_producer import T0, read_events

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
