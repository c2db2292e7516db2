"""The publisher's per-partition send order (producer/lanes.py): FIFO turns per lane, lanes
independent of each other, cancel-safety, settled(), and the partition a key maps to."""

from __future__ import annotations

import asyncio
import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from conntrack.core.kafka import partition_of
from conntrack.producer.lanes import Lanes
from conntrack.producer.publisher import Publisher


@given(st.binary(min_size=1, max_size=64), st.integers(min_value=1, max_value=200))
def test_a_key_maps_to_the_partition_kafkas_default_partitioner_gives_it(
    key: bytes, partitions: int
) -> None:
    everything = list(range(partitions))
    assert partition_of(key, partitions) == DefaultPartitioner()(key, everything, everything)


def test_count_must_be_positive() -> None:
    with pytest.raises(ValueError, match="count must be >= 1"):
        Lanes(0)


async def _take_turn(lanes: Lanes, lane: int, ticket: asyncio.Future[None] | None) -> None:
    await lanes.acquire(lane, ticket)
    lanes.release(lane)


async def test_turns_come_in_the_order_they_were_reserved() -> None:
    lanes = Lanes(2)
    order: list[int] = []
    assert lanes.reserve(0) is None  # free: held at once

    async def turn(n: int, ticket: asyncio.Future[None] | None) -> None:
        await lanes.acquire(0, ticket)
        order.append(n)
        await asyncio.sleep(0)  # holding it across an await
        lanes.release(0)

    # Reserved in this order, started in the reverse one.
    tickets = [lanes.reserve(0) for _ in range(5)]
    tasks = [asyncio.create_task(turn(n, tickets[n])) for n in reversed(range(5))]
    await asyncio.sleep(0.01)
    assert order == []
    lanes.release(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert lanes.busy == 0


async def test_a_held_lane_does_not_hold_up_another() -> None:
    lanes = Lanes(2)
    assert lanes.reserve(0) is None
    waiting = asyncio.create_task(_take_turn(lanes, 0, lanes.reserve(0)))
    # Lane 1 is free although lane 0 is held with a waiter in line.
    await asyncio.wait_for(_take_turn(lanes, 1, lanes.reserve(1)), timeout=5)
    assert not waiting.done()
    lanes.release(0)
    await asyncio.wait_for(waiting, timeout=5)


async def test_a_cancelled_waiter_gives_its_place_up_and_keeps_the_order() -> None:
    lanes = Lanes(1)
    order: list[str] = []
    assert lanes.reserve(0) is None

    async def turn(name: str, ticket: asyncio.Future[None] | None) -> None:
        await lanes.acquire(0, ticket)
        order.append(name)
        lanes.release(0)

    a = asyncio.create_task(turn("a", lanes.reserve(0)))
    b = asyncio.create_task(turn("b", lanes.reserve(0)))
    c = asyncio.create_task(turn("c", lanes.reserve(0)))
    await asyncio.sleep(0)
    b.cancel()
    lanes.release(0)
    await asyncio.gather(a, c)
    assert b.cancelled()
    assert order == ["a", "c"]
    assert lanes.busy == 0


async def test_a_waiter_cancelled_as_its_turn_comes_passes_it_on() -> None:
    lanes = Lanes(1)
    assert lanes.reserve(0) is None
    first = asyncio.create_task(_take_turn(lanes, 0, lanes.reserve(0)))
    second_ticket = lanes.reserve(0)
    await asyncio.sleep(0)
    lanes.release(0)  # hands the turn to `first`...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(_take_turn(lanes, 0, second_ticket), timeout=5)
    assert lanes.busy == 0


async def test_settled_waits_for_earlier_turns_only() -> None:
    lanes = Lanes(3)
    assert lanes.reserve(0) is None
    assert lanes.reserve(2) is None
    settled = asyncio.create_task(lanes.settled(10))
    await asyncio.sleep(0)
    later = lanes.reserve(1)  # reserved after settled(): not waited for
    assert later is None
    lanes.release(0)
    await asyncio.sleep(0.01)
    assert not settled.done()  # lane 2's turn is still held
    lanes.release(2)
    assert await asyncio.wait_for(settled, timeout=5) is True
    assert lanes.busy == 1  # lane 1, still held by the later turn
    lanes.release(1)
    assert lanes.busy == 0


async def test_settled_gives_up_at_its_timeout_and_still_passes_the_turn_on() -> None:
    lanes = Lanes(1)
    assert lanes.reserve(0) is None
    assert await lanes.settled(0.05) is False
    after = lanes.reserve(0)
    lanes.release(0)
    await asyncio.wait_for(_take_turn(lanes, 0, after), timeout=5)
    assert lanes.busy == 0


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=7), min_size=1, max_size=60),
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=0, max_value=2**32),
)
def test_each_keys_calls_keep_their_order_under_any_interleaving(
    keys: list[int], count: int, seed: int
) -> None:
    """Calls reserve their turn when they start and then wait a random while, as sends
    into a full batch do: each key's calls still complete in the order they started."""

    rnd = random.Random(seed)

    async def run() -> dict[str, list[int]]:
        lanes = Lanes(count)
        done: dict[str, list[int]] = {}

        async def call(seq: int, key: str, pause: float) -> None:
            lane = lanes.lane_of(key)
            ticket = lanes.reserve(lane)
            await asyncio.sleep(pause)
            await lanes.acquire(lane, ticket)
            try:
                await asyncio.sleep(rnd.choice([0, 0, 0.001]))
                done.setdefault(key, []).append(seq)
            finally:
                lanes.release(lane)

        await asyncio.gather(
            *(call(seq, f"c-{k}", rnd.choice([0, 0.001, 0.002])) for seq, k in enumerate(keys))
        )
        assert lanes.busy == 0
        return done

    done = asyncio.run(run())
    for key, seqs in done.items():
        expected = [seq for seq, k in enumerate(keys) if f"c-{k}" == key]
        assert seqs == expected


def test_the_publisher_refuses_a_partitioner_of_its_own() -> None:
    """It places each connection's events itself; another partitioner would split a lane."""
    with pytest.raises(ValueError, match="partitioner: the publisher places"):
        Publisher("127.0.0.1:1", "events", "gw", partitioner=lambda *_: 0)
