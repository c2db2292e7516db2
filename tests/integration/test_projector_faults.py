"""Faults injected between the projector and a real database, in-process: a COMMIT whose answer
is lost, and a rival that moves a partition on under the projector's feet."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.core.events import Activity, Connected, Event
from conntrack.core.fold import ConnectionState, NodeState, fold
from conntrack.core.history_store import NodeHistory
from conntrack.core.settings import Settings
from conntrack.core.store import BatchResult, OnRefused, ProjectionStore
from conntrack.projector.dead_letter import ERROR, SOURCE_OFFSET, SOURCE_PARTITION
from conntrack.projector.runner import Projector
from tests.support.events import T0, as_records, make_events
from tests.support.kafka import (
    create_topic,
    delete_topics,
    log_end_offsets,
    publish,
    read_dead_letters,
    unique,
)
from tests.support.projector import (
    assert_each_advance_exact,
    fenced,
    per_partition,
    running,
    settled_count,
    wait_caught_up,
)

pytestmark = [pytest.mark.kafka]


class LostCommitReplies(ProjectionStore):
    """Commits every n-th batch for real, then reports the connection as lost (as when the
    database dies between COMMIT and its reply)."""

    def __init__(self, engine: AsyncEngine, every: int) -> None:
        super().__init__(engine)
        self.every = every
        self.calls = 0
        self.lost = 0

    async def apply_batch(
        self,
        topic: str,
        advances: Mapping[int, tuple[int, int]],
        states: Mapping[str, ConnectionState],
        nodes: Mapping[str, NodeState] | None = None,
        on_refused: OnRefused | None = None,
        history: NodeHistory | None = None,
    ) -> BatchResult:
        self.calls += 1
        result = await super().apply_batch(topic, advances, states, nodes, on_refused, history)
        if self.calls % self.every == 0:
            self.lost += 1
            raise OperationalError("COMMIT", {}, ConnectionResetError("reply lost"))
        return result


async def test_a_commit_whose_reply_was_lost_counts_once(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    s = kafka_settings.model_copy(update={"batch_max_events": 50, "retry_max_backoff_seconds": 0.2})
    store = LostCommitReplies(engine, every=3)
    events = make_events(random.Random(11), "l", 1500, 200)
    async with running(Projector(s, store)) as projector:
        await publish(s.kafka_bootstrap_servers, s.events_topic, as_records(events))
        await wait_caught_up(store, s)
        assert store.lost > 0
        assert fenced(projector) == 0
        # Every lost reply was recognised as committed: each record counted exactly once.
        assert await settled_count(projector, len(events)) == len(events)
    assert await store.all_states() == fold(events)


async def test_a_rival_moving_the_partition_on_fences_the_batch(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    s = kafka_settings.model_copy(update={"batch_max_events": 100})
    store = ProjectionStore(engine)
    events = make_events(random.Random(12), "f", 600, 100)
    records = as_records(events)
    skip = 5
    async with running(Projector(s, store)) as projector:
        await publish(s.kafka_bootstrap_servers, s.events_topic, records[:300])
        await wait_caught_up(store, s)
        # While it is idle, a rival (a stale owner that has not noticed a rebalance) claims the
        # next `skip` records of every partition, moving the stored positions on through the
        # same fence. The projector still expects the old positions: its next batch is fenced,
        # it re-reads the positions and goes on from the rival's.
        before = await store.positions(s.events_topic, range(3))
        await store.apply_batch(s.events_topic, {p: (o, o + skip) for p, o in before.items()}, {})
        metas = await publish(s.kafka_bootstrap_servers, s.events_topic, records[300:])
        await wait_caught_up(store, s)
        assert fenced(projector) >= 1
        assert await settled_count(projector, len(records) - 3 * skip) == len(records) - 3 * skip
    claimed = {(p, o) for p, start in before.items() for o in range(start, start + skip)}
    applied = [
        e
        for e, m in zip(events[300:], metas, strict=True)
        if (m.partition, m.offset) not in claimed
    ]
    assert await store.all_states() == fold(events[:300] + applied)


class HeldFirstWrite(ProjectionStore):
    """The first batch's write waits until released, so the projector prepares the next batch
    meanwhile (its pipelining), and the test can move positions under both."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.writing = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    async def apply_batch(
        self,
        topic: str,
        advances: Mapping[int, tuple[int, int]],
        states: Mapping[str, ConnectionState],
        nodes: Mapping[str, NodeState] | None = None,
        on_refused: OnRefused | None = None,
        history: NodeHistory | None = None,
    ) -> BatchResult:
        self.calls += 1
        if self.calls == 1:
            self.writing.set()
            await self.release.wait()
        return await super().apply_batch(topic, advances, states, nodes, on_refused, history)


async def test_a_batch_prepared_behind_a_fenced_one_is_dropped_and_read_again(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    s = kafka_settings.model_copy(update={"batch_max_events": 60})
    store = HeldFirstWrite(engine)
    events = make_events(random.Random(13), "p", 600, 100)
    records = as_records(events)
    prepared = 0
    original = Projector._prepare

    async def counting(self: Projector, *args: Any) -> Any:
        nonlocal prepared
        prepared += 1
        return await original(self, *args)

    skip = 2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Projector, "_prepare", counting)
        async with running(Projector(s, store)) as projector:
            metas = await publish(s.kafka_bootstrap_servers, s.events_topic, records)
            await asyncio.wait_for(store.writing.wait(), 30)
            for _ in range(200):  # until the next batch has been prepared behind the first
                if prepared >= 2:
                    break
                await asyncio.sleep(0.05)
            assert prepared >= 2
            # A rival claims the next `skip` records of every partition: the held batch is
            # fenced, and the one prepared from the positions it would have left must not be
            # written (it would start where nothing was stored).
            before = await store.positions(s.events_topic, range(3))
            await store.apply_batch(
                s.events_topic, {p: (o, o + skip) for p, o in before.items()}, {}
            )
            store.release.set()
            await wait_caught_up(store, s)
            dropped = projector.metrics.registry.get_sample_value(
                "conntrack_projector_prepared_batches_dropped_total"
            )
            assert fenced(projector) >= 1
            assert dropped is not None
            assert dropped >= 1
    claimed = {(p, o) for p, start in before.items() for o in range(start, start + skip)}
    applied = [
        e for e, m in zip(events, metas, strict=True) if (m.partition, m.offset) not in claimed
    ]
    assert await store.all_states() == fold(applied)


async def test_a_partition_assigned_again_while_a_batch_is_in_flight_is_no_position_gap(
    kafka_settings: Settings, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A rebalance during the fetch of the next batch while one is being written: another owner
    moved the batch's partition on, then it was assigned back (the listener, which aiokafka runs
    inside the fetch, seeks it to its stored position). The next batch starts where that seek
    put it, not where the batch in flight would have left it: no position gap is counted or
    logged (an alert on that counter must not fire on a rebalance)."""
    caplog.set_level(logging.INFO, logger="conntrack.projector.runner")
    s = kafka_settings.model_copy(update={"batch_max_events": 300})
    store = HeldFirstWrite(engine)
    events = make_events(random.Random(17), "g", 3000, 300)
    records = as_records(events)
    original = Projector._fetch
    skip = 400  # past the batch in flight's end
    moved: dict[int, int] = {}

    async def rebalanced_fetch(self: Projector) -> Any:
        if not self._in_flight_ends or moved:
            return await original(self)
        # The first batch is being written. The other owner takes its partition `skip`
        # records further on; then it is assigned back, as the assignment listener does, and
        # this fetch hands over the new read's first records, the batch still in flight
        # (fault injection; the other partitions are held back meanwhile).
        await store.writing.wait()
        (tp,) = self._in_flight_ends
        start = (await store.positions(s.events_topic, [tp.partition]))[tp.partition]
        await store.apply_batch(s.events_topic, {tp.partition: (start, start + skip)}, {})
        moved[tp.partition] = start
        others = [t for t in self._consumer.assignment() if t != tp]
        self._consumer.pause(*others)
        await self._partitions.seek_to_stored([tp])
        for _ in range(100):
            fetched = await original(self)
            if fetched.records:
                break
        self._consumer.resume(*others)
        store.release.set()
        return fetched

    # All published first, so that the first batch is a full one.
    metas = await publish(s.kafka_bootstrap_servers, s.events_topic, records)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Projector, "_fetch", rebalanced_fetch)
        async with running(Projector(s, store)) as projector:
            await asyncio.wait_for(store.writing.wait(), 30)
            await wait_caught_up(store, s)
            gaps = per_partition(
                projector, "conntrack_projector_position_gaps_total", s.events_topic
            )
    assert moved
    assert gaps == 0
    assert "event=position_gap" not in caplog.text
    claimed = {(p, o) for p, start in moved.items() for o in range(start, start + skip)}
    applied = [
        e for e, m in zip(events, metas, strict=True) if (m.partition, m.offset) not in claimed
    ]
    assert await store.all_states() == fold(applied)


class FirstPositionsReadFails(ProjectionStore):
    """The first read of the stored positions fails with an unexpected error, as a bug or an
    unforeseen driver error would: the assignment listener dies with it."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.failed = False

    async def positions(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected: positions unreadable")
        return await super().positions(topic, partitions)


async def test_partitions_left_unpositioned_by_a_failed_listener_are_positioned_later(
    kafka_settings: Settings, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    store = FirstPositionsReadFails(engine)
    events = make_events(random.Random(13), "u", 300, 50)
    async with running(Projector(kafka_settings, store)) as projector:
        await publish(
            kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic, as_records(events)
        )
        await wait_caught_up(store, kafka_settings)
        assert store.failed
        assert "event=positioning_late" in caplog.text
        assert projector.records_committed == len(events)
    assert await store.all_states() == fold(events)


class PositionsAnsweredAfterAHandover(ProjectionStore):
    """The assignment listener's first read of the stored positions answers only once the
    consumer has handed records over: until then the consumer reads from the group's committed
    offset, as it does whenever the listener is slower than the first fetch."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.handed_over = asyncio.Event()
        self.held = False

    async def positions(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        result = await super().positions(topic, partitions)
        if not self.held:
            self.held = True
            await asyncio.wait_for(self.handed_over.wait(), 30)
        return result


async def test_records_fetched_before_the_assignment_seek_are_never_applied(
    kafka_settings: Settings, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """The group's committed offset is ahead of the stored position (a read model restored from
    an older backup, or recreated, while the group's offsets stayed): the consumer first reads
    from there, and the assignment listener's seek lands while the projector takes a batch in
    slices. The records taken before the seek must not be committed as if they followed the
    stored position (before the fix: 0 -> 2500 with 1000 records, the first 1500 never
    applied)."""
    caplog.set_level(logging.DEBUG, logger="conntrack.projector.runner")
    topic = unique("events")
    await create_topic(kafka_settings.kafka_bootstrap_servers, topic, 1)
    s = kafka_settings.model_copy(update={"events_topic": topic})
    tp = TopicPartition(topic, 0)
    try:
        events = make_events(random.Random(14), "b", 9000, 600)
        await publish(s.kafka_bootstrap_servers, topic, as_records(events))
        ahead = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            group_id=s.consumer_group,
            enable_auto_commit=False,
        )
        await ahead.start()
        try:
            ahead.assign([tp])
            await ahead.commit({tp: 1500})
        finally:
            await ahead.stop()
        store = PositionsAnsweredAfterAHandover(engine)
        projector = Projector(s, store)
        getmany = projector._consumer.getmany  # fault injection: the consumer's timing

        async def observed(*args: Any, **kwargs: Any) -> Any:
            if store.handed_over.is_set():
                # The listener's seek lands in the yield between two slices of a batch.
                async with asyncio.timeout(30):
                    # Polled: the listener has no hook, its effect is what is observable.
                    while 0 not in projector.owned_positions:  # noqa: ASYNC110
                        await asyncio.sleep(0.001)
            got = await getmany(*args, **kwargs)
            if any(got.values()):
                store.handed_over.set()
            return got

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(projector._consumer, "getmany", observed)
            async with running(projector):
                await wait_caught_up(store, s)
        assert store.handed_over.is_set()
        assert await store.all_states() == fold(events)
        assert_each_advance_exact(caplog.text)
    finally:
        await delete_topics(s.kafka_bootstrap_servers, [topic])


async def test_records_that_do_not_begin_at_the_position_are_read_again(
    kafka_settings: Settings, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever moved the consumer (here a seek behind the projector's back, as a library fault
    would), a batch whose records begin past the stored position is not applied: the partition
    is read again from its position."""
    caplog.set_level(logging.DEBUG, logger="conntrack.projector.runner")
    s = kafka_settings
    store = ProjectionStore(engine)
    events = make_events(random.Random(15), "r", 1500, 150)
    records = as_records(events)
    tps = [TopicPartition(s.events_topic, p) for p in range(3)]
    async with running(Projector(s, store)) as projector:
        await publish(s.kafka_bootstrap_servers, s.events_topic, records[:600])
        positions = await wait_caught_up(store, s)
        consumer = projector._consumer  # fault injection
        consumer.pause(*tps)
        await publish(s.kafka_bootstrap_servers, s.events_topic, records[600:])
        for tp in tps:
            consumer.seek(tp, positions[tp.partition] + 5)
        consumer.resume(*tps)
        await wait_caught_up(store, s)
        gaps = per_partition(projector, "conntrack_projector_position_gaps_total", s.events_topic)
    assert gaps == 3
    assert "event=position_gap" in caplog.text
    assert await store.all_states() == fold(events)
    assert_each_advance_exact(caplog.text)


async def test_offsets_kafka_leaves_unused_are_passed_over(
    kafka_settings: Settings, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway publishing in transactions leaves a commit marker after each one: offsets no
    consumer sees. They are not gaps: every event is applied, none twice."""
    caplog.set_level(logging.INFO, logger="conntrack.projector.runner")
    s = kafka_settings.model_copy(update={"batch_max_events": 37})
    store = ProjectionStore(engine)
    events = make_events(random.Random(16), "t", 1200, 100)
    records = as_records(events)
    producer = AIOKafkaProducer(
        bootstrap_servers=s.kafka_bootstrap_servers, transactional_id=unique("gateway")
    )
    await producer.start()
    try:
        for i in range(0, len(records), 40):
            async with producer.transaction():
                for key, value, headers in records[i : i + 40]:
                    await producer.send(s.events_topic, key=key, value=value, headers=headers)
    finally:
        await producer.stop()
    ends = await log_end_offsets(s.kafka_bootstrap_servers, s.events_topic)
    assert sum(ends.values()) > len(records)  # the markers take offsets too
    async with running(Projector(s, store)) as projector:
        for _ in range(600):
            if await store.all_states() == fold(events):
                break
            await asyncio.sleep(0.05)
        assert await settled_count(projector, len(records)) == len(records)
        unused = per_partition(
            projector, "conntrack_projector_offsets_unused_total", s.events_topic
        )
    assert await store.all_states() == fold(events)
    assert unused > 0
    assert "event=offsets_unused" in caplog.text


async def _refuse_a_user_agent(engine: AsyncEngine, user_agent: str) -> None:
    """Make the database refuse rows with this user agent, as a future constraint might."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.exec_driver_sql(
                "ALTER TABLE connections ADD CONSTRAINT refused_for_the_test "
                f"CHECK (user_agent IS DISTINCT FROM '{user_agent}')"
            )
        else:
            await conn.exec_driver_sql(
                "CREATE TRIGGER refused_for_the_test BEFORE INSERT ON connections "
                f"WHEN NEW.user_agent = '{user_agent}' "
                "BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
            )


async def test_a_record_the_database_refuses_is_dead_lettered_and_the_partition_moves_on(
    kafka_settings: Settings, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    s = kafka_settings.model_copy(
        update={"refused_batch_attempts": 2, "retry_max_backoff_seconds": 0.2}
    )
    await _refuse_a_user_agent(engine, "refuse-me")
    store = ProjectionStore(engine)
    events = make_events(random.Random(17), "z", 900, 120)
    refused = Event("z-refused", "z-refused-conn", "gw", T0 + 5, Connected("10.0.0.1", "refuse-me"))
    later = Event("z-later", "z-refused-conn", "gw", T0 + 6, Activity(1))
    all_events = [*events[:450], refused, later, *events[450:]]
    async with running(Projector(s, store)) as projector:
        metas = await publish(s.kafka_bootstrap_servers, s.events_topic, as_records(all_events))
        await wait_caught_up(store, s)
        retries = projector.metrics.registry.get_sample_value(
            "conntrack_projector_retries_total", {"cause": "database"}
        )
        assert retries is not None
        assert retries >= 2  # the configured attempts, then the refused rows were isolated
    # Everything but the refused connection's records is applied; those are dead letters with
    # the database's error and their provenance.
    assert await store.all_states() == fold(events)
    where = {(m.partition, m.offset) for m in metas[450:452]}
    letters = await read_dead_letters(s.kafka_bootstrap_servers, s.dead_letter_topic, 2)
    assert {
        (int(dict(x.headers)[SOURCE_PARTITION]), int(dict(x.headers)[SOURCE_OFFSET]))
        for x in letters
    } == where
    assert all(b"database refused" in dict(x.headers)[ERROR] for x in letters)
