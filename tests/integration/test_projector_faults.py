"""Faults injected between the projector and a real database, in-process: a COMMIT whose answer
is lost, and a rival that moves a partition on under the projector's feet."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from connection_tracker.settings import Settings
from projector.fold import ConnectionState, fold
from projector.runner import Projector
from projector.store import BatchResult, ProjectionStore
from tests.integration.test_projector_process import (
    as_records,
    make_events,
    publish,
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
    ) -> BatchResult:
        self.calls += 1
        result = await super().apply_batch(topic, advances, states)
        if self.calls % self.every == 0:
            self.lost += 1
            raise OperationalError("COMMIT", {}, ConnectionResetError("reply lost"))
        return result


def fenced(projector: Projector) -> float:
    value = projector.metrics.registry.get_sample_value("conntrack_projector_fenced_batches_total")
    assert value is not None
    return value


@contextlib.asynccontextmanager
async def running(projector: Projector) -> AsyncIterator[Projector]:
    async with projector:
        task = asyncio.create_task(projector.run())
        try:
            yield projector
        finally:
            await projector.stop()
            await asyncio.wait_for(task, 30)


async def settled_count(projector: Projector, expected: int, within: float = 10.0) -> int:
    """records_committed once it stops trailing the database: the stored positions (what
    wait_caught_up polls) commit a moment before the batch's records are counted, so wait until
    the count reaches `expected` (or the time is up); an overshoot is returned at once."""
    for _ in range(int(within / 0.05)):
        if projector.records_committed >= expected:
            break
        await asyncio.sleep(0.05)
    return projector.records_committed


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
    ) -> BatchResult:
        self.calls += 1
        if self.calls == 1:
            self.writing.set()
            await self.release.wait()
        return await super().apply_batch(topic, advances, states)


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
