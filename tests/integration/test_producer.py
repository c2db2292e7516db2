"""The publisher on the real broker: keys and order, coalescing, lifecycle, bad input, no broker."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import pytest
from aiokafka.partitioner import murmur2

from conntrack.core.events import (
    HEADERS,
    Activity,
    Connected,
    Disconnected,
    Event,
    InvalidEvent,
    decode,
)
from conntrack.core.settings import Settings
from conntrack.producer.errors import (
    BrokerUnavailableError,
    PublisherClosedError,
    TopicNotFoundError,
)
from conntrack.producer.publisher import Publisher
from conntrack.producer.simulator import Workload, generate
from tests.support.events import T0
from tests.support.kafka import read_all, read_events

pytestmark = [pytest.mark.kafka]

SECOND = 1_000_000_000


def publisher(settings: Settings, **options: Any) -> Publisher:
    return Publisher(settings.kafka_bootstrap_servers, settings.events_topic, "gw-test", **options)


async def test_records_are_keyed_by_connection_partitioned_by_key_and_kept_in_order(
    kafka_settings: Settings,
) -> None:
    events = list(generate(Workload(connections=40, activities_per_connection=4, seed=21), T0))
    async with publisher(kafka_settings) as pub:
        for event in events:
            await pub.publish(event)
        await pub.flush()
        assert pub.stats().delivered == len(events)

    records = await read_all(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic)
    assert len(records) == len(events)
    partitions_of: dict[str, set[int]] = defaultdict(set)
    order: dict[str, list[Event]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        event = decode(record.value, record.key)
        assert record.key == event.connection_id.encode("utf-8")
        assert tuple(record.headers) == HEADERS
        # The Java client's partitioner, so gateways in any language agree on the partition.
        assert record.partition == (murmur2(record.key) & 0x7FFFFFFF) % 3
        partitions_of[event.connection_id].add(record.partition)
        order[event.connection_id].append(event)
    assert all(len(p) == 1 for p in partitions_of.values())
    assert len(set().union(*partitions_of.values())) == 3  # 40 keys spread over every partition
    expected: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        expected[event.connection_id].append(event)
    assert order == expected


async def test_calls_stamp_fresh_ids_and_nanosecond_gateway_times(
    kafka_settings: Settings,
) -> None:
    clock = iter([T0 + 987_654_321, T0 + 2 * SECOND + 1])
    async with publisher(
        kafka_settings, activity_interval_s=0, wall_clock_ns=lambda: next(clock)
    ) as pub:
        a = await pub.connected("c-1", "2001:db8::1", "ua/1", at_ns=T0 + 123_456_789)
        b = await pub.activity("c-1", frames=7)
        c = await pub.disconnected("c-1", status_code=1001, reason="going away")
    assert b is not None
    got = await read_events(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic)
    assert got == [a, b, c]
    assert len({a.event_id, b.event_id, c.event_id}) == 3
    # Times are the gateway clock's nanoseconds, not rounded to micro- or milliseconds.
    assert [e.occurred_at_ns for e in got] == [
        T0 + 123_456_789,
        T0 + 987_654_321,
        T0 + 2 * SECOND + 1,
    ]
    assert got[0].payload == Connected("2001:db8::1", "ua/1")
    assert got[1].payload == Activity(7)
    assert got[2].payload == Disconnected(1001, "going away")
    assert {e.gateway_id for e in got} == {"gw-test"}


async def test_a_busy_connection_costs_one_activity_and_the_rest_is_flushed_on_disconnect(
    kafka_settings: Settings,
) -> None:
    async with publisher(kafka_settings, activity_interval_s=3600) as pub:
        await pub.connected("busy", "10.0.0.1", "ua", at_ns=T0)
        first = await pub.activity("busy", frames=1, at_ns=T0 + 1)
        merged = [await pub.activity("busy", frames=2, at_ns=T0 + 1 + i) for i in range(1, 1000)]
        assert first is not None
        assert merged == [None] * 999
        assert pub.stats().pending_activities == 1
        assert pub.stats().coalesced_activities == 999
        await pub.disconnected("busy", at_ns=T0 + 5000)
        assert pub.stats().pending_activities == 0
    got = await read_events(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic)
    assert [e.kind for e in got] == ["connected", "activity", "activity", "disconnected"]
    assert got[1] == first
    assert got[2].payload == Activity(frames=2 * 999)
    assert got[2].occurred_at_ns == T0 + 1000  # the latest activity time
    assert got[2].event_id not in {first.event_id, got[0].event_id, got[3].event_id}


async def test_pending_activity_is_flushed_on_close(kafka_settings: Settings) -> None:
    pub = publisher(kafka_settings, activity_interval_s=3600)
    await pub.start()
    for cid in ("x", "y", "z"):
        for i in range(50):
            await pub.activity(cid, frames=1, at_ns=T0 + i * SECOND)
    assert pub.stats().pending_activities == 3
    await pub.close()
    got = await read_events(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic)
    for cid in ("x", "y", "z"):
        mine = [e for e in got if e.connection_id == cid]
        assert len(mine) == 2
        assert max(e.occurred_at_ns for e in mine) == T0 + 49 * SECOND
        assert sum(e.payload.frames for e in mine if isinstance(e.payload, Activity)) == 50


async def test_flush_publishes_pending_activity(kafka_settings: Settings) -> None:
    async with publisher(kafka_settings, activity_interval_s=3600) as pub:
        await pub.activity("f", at_ns=T0)
        await pub.activity("f", frames=3, at_ns=T0 + 9)
        await pub.flush()
        got = await read_events(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic)
        assert [(e.occurred_at_ns, e.payload) for e in got] == [
            (T0, Activity(1)),
            (T0 + 9, Activity(3)),
        ]


async def test_the_interval_bounds_activity_events_and_the_timer_publishes_the_rest(
    kafka_settings: Settings,
) -> None:
    interval_s = 0.2
    calls = 0
    async with publisher(kafka_settings, activity_interval_s=interval_s) as pub:
        started = time.monotonic()
        while time.monotonic() - started < 1.5:
            calls += 1
            await pub.activity("stream", at_ns=T0 + calls)
            await asyncio.sleep(0.001)
        elapsed = time.monotonic() - started
        # No flush, no disconnect: the last merged activity must go out by itself.
        deadline = time.monotonic() + 30
        while pub.stats().pending_activities or pub.stats().in_flight:
            assert time.monotonic() < deadline, "coalesced activity was never published"
            await asyncio.sleep(0.05)
        got = await read_events(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic)
    assert calls > 100
    # One event when the stream starts, then at most one per interval.
    assert 2 <= len(got) <= elapsed / interval_s + 2
    assert sum(e.payload.frames for e in got if isinstance(e.payload, Activity)) == calls
    assert max(e.occurred_at_ns for e in got) == T0 + calls


async def test_start_and_stop_are_idempotent_and_a_stopped_publisher_refuses_events(
    kafka_settings: Settings,
) -> None:
    pub = publisher(kafka_settings)
    with pytest.raises(PublisherClosedError):
        await pub.connected("early", "10.0.0.1", "ua")
    await pub.start()
    await pub.start()
    assert pub.started
    await asyncio.gather(pub.stop(), pub.stop())
    await pub.stop()
    assert not pub.started
    with pytest.raises(PublisherClosedError):
        await pub.activity("late")
    with pytest.raises(PublisherClosedError):
        await pub.flush()
    # It can be started again, and then it publishes.
    async with pub:
        again = await pub.connected("again", "10.0.0.2", "ua")
    async with pub:
        pass
    got = await read_events(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic)
    assert got == [again]
    assert pub.undelivered == 0


async def test_bad_input_is_refused_before_anything_is_sent(kafka_settings: Settings) -> None:
    failed: list[Event] = []
    async with publisher(kafka_settings, on_undeliverable=lambda e, _: failed.append(e)) as pub:
        with pytest.raises(InvalidEvent, match="connection_id is required"):
            await pub.connected("", "10.0.0.1", "ua")
        with pytest.raises(InvalidEvent, match="must be at most 255 characters"):
            await pub.activity("x" * 256)
        with pytest.raises(InvalidEvent, match="outside"):
            await pub.activity("ok", at_ns=0)
        with pytest.raises(InvalidEvent, match="frames"):
            await pub.activity("ok", frames=-1)
        with pytest.raises(InvalidEvent, match="status_code"):
            await pub.disconnected("ok", status_code=2**32)
        # The codec keeps close codes to 16 bits (the read model's column): refused at the call.
        with pytest.raises(InvalidEvent, match=r"status_code 65536 is outside 0\.\.65535"):
            await pub.disconnected("ok", status_code=65536)
        # Every call makes the projector's own check, so what it would dead-letter never leaves:
        # a NUL cannot be stored by PostgreSQL, an unpaired surrogate cannot be encoded.
        with pytest.raises(InvalidEvent, match="NUL"):
            await pub.activity("a\x00b")
        with pytest.raises(InvalidEvent, match="NUL"):
            await pub.connected("a\x00b", "10.0.0.1", "ua")
        with pytest.raises(InvalidEvent, match="NUL"):
            await pub.disconnected("a\x00b")
        with pytest.raises(InvalidEvent, match="cannot encode"):
            await pub.activity("\ud800")
        assert pub.stats().pending_activities == 0
        with pytest.raises(InvalidEvent, match="outside"):
            await pub.disconnected("ok", at_ns=2**62)
        with pytest.raises(InvalidEvent, match="event_id"):
            await pub.publish(Event("", "ok", "gw", T0, Activity(1)))
        await pub.flush()
        assert pub.stats().delivered == 0
    with pytest.raises(InvalidEvent, match="gateway_id"):
        Publisher(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic, "")
    assert failed == []
    assert await read_all(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic) == []


async def test_an_unreachable_broker_is_a_clear_error_after_the_timeout() -> None:
    pub = Publisher("127.0.0.1:1", "any-topic", "gw", delivery_timeout_s=1.5)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match=r"cannot reach Kafka at 127\.0\.0\.1:1"):
        await pub.start()
    assert time.monotonic() - started < 30  # bounded by the timeout, not hanging
    assert not pub.started
    with pytest.raises(PublisherClosedError):
        await pub.activity("c")
    await pub.stop()  # nothing to stop: still fine
    assert pub.stats().undelivered == 0


async def test_a_missing_topic_is_a_clear_error(kafka_bootstrap: str) -> None:
    pub = Publisher(kafka_bootstrap, "no-such-topic-ever-3c1d", "gw", delivery_timeout_s=10)
    with pytest.raises(TopicNotFoundError, match="conntrack-producer topics"):
        await pub.start()
    assert not pub.started


async def test_concurrent_connections_keep_their_order_through_coalescing(
    kafka_settings: Settings,
) -> None:
    async def session(pub: Publisher, cid: str) -> None:
        await pub.connected(cid, "10.0.0.1", "ua", at_ns=T0)
        for i in range(1, 200):
            await pub.activity(cid, at_ns=T0 + i)
            if i % 20 == 0:
                await asyncio.sleep(0.005)  # let the timer and the other sessions run
        await pub.disconnected(cid, at_ns=T0 + 1000)

    async with publisher(kafka_settings, activity_interval_s=0.01) as pub:
        await asyncio.gather(*(session(pub, f"s{n}") for n in range(30)))
    got = await read_events(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic)
    for n in range(30):
        mine = [e for e in got if e.connection_id == f"s{n}"]
        assert mine[0].kind == "connected"
        assert mine[-1].kind == "disconnected"
        activities = mine[1:-1]
        assert {e.kind for e in activities} == {"activity"}
        times = [e.occurred_at_ns for e in activities]
        assert times == sorted(times)
        assert times[-1] == T0 + 199
        assert sum(e.payload.frames for e in activities if isinstance(e.payload, Activity)) == 199


async def test_a_publish_racing_stop_is_either_sent_or_refused_never_lost(
    kafka_settings: Settings,
) -> None:
    failed: list[Event] = []
    pub = publisher(kafka_settings, on_undeliverable=lambda e, _: failed.append(e))
    await pub.start()
    outcomes = await asyncio.gather(
        *(pub.connected(f"r{i}", "10.0.0.1", "ua", at_ns=T0) for i in range(50)),
        pub.stop(),
        *(pub.connected(f"q{i}", "10.0.0.1", "ua", at_ns=T0) for i in range(50)),
        return_exceptions=True,
    )
    sent = [o for o in outcomes if isinstance(o, Event)]
    refused = [o for o in outcomes if isinstance(o, PublisherClosedError)]
    assert len(sent) + len(refused) + 1 == len(outcomes)  # + stop()'s None
    assert sent
    assert refused
    assert outcomes[50] is None
    got = await read_events(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic)
    assert sorted(e.event_id for e in got) == sorted(e.event_id for e in sent)
    assert failed == []


async def test_a_failing_callback_does_not_break_the_publisher(kafka_settings: Settings) -> None:
    def broken(event: Event, error: BaseException) -> None:
        raise RuntimeError("callback bug")

    pub = publisher(kafka_settings, on_undeliverable=broken, delivery_timeout_s=5)
    await pub.start()
    await pub.stop()
    # Publishing into a stopped producer in a turn taken before stop() is reported, then refused.
    lanes = pub._handover.lanes
    lane = lanes.lane_of("c")
    event = Event("e", "c", "gw", T0, Activity(1))
    with pytest.raises(PublisherClosedError):
        await pub._handover.send_in_turn(lane, lanes.reserve(lane), [event], 0.0)
    assert pub.undelivered == 1


async def test_exactly_one_activity_per_interval_by_the_publishers_clock(
    kafka_settings: Settings,
) -> None:
    # The publisher's monotonic clock is driven by the test; an interval of an hour of it
    # means the background timer (which sleeps in real time) never fires during the test.
    hour = 3600 * SECOND
    now = [0]
    async with publisher(
        kafka_settings, activity_interval_s=3600, monotonic_ns=lambda: now[0]
    ) as pub:
        for step in range(50):  # 50 calls, a tenth of an interval apart: five whole intervals
            now[0] = step * hour // 10
            await pub.activity("tick", frames=1, at_ns=T0 + step)
        await pub.disconnected("tick", at_ns=T0 + 60)
    got = await read_events(kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic)
    activities = [e.payload for e in got if isinstance(e.payload, Activity)]
    times = [e.occurred_at_ns - T0 for e in got if isinstance(e.payload, Activity)]
    # Published at calls 0, 10, 20, 30 and 40 (each carrying what its interval merged), and the
    # rest (41..49) just before the Disconnected.
    assert times == [0, 10, 20, 30, 40, 49]
    assert [a.frames for a in activities] == [1, 10, 10, 10, 10, 9]
    assert got[-1].kind == "disconnected"
