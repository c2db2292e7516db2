"""conntrack.core.batch.gen0_threshold: the collector threshold a batch writer runs under
keeps the young collections away from the batches it holds."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from conntrack.core.batch import Batch, gen0_threshold
from conntrack.core.events import encode, record_key
from conntrack.core.process import BATCH_GEN0_THRESHOLD
from conntrack.producer.simulator import Workload, generate

BATCH = 8000  # gen0_threshold(BATCH) is above the 50000 floor: the per-event rule decides


@dataclass
class _Record:  # as aiokafka's ConsumerRecord: a plain dataclass, tracked by the collector
    partition: int
    offset: int
    key: bytes
    value: bytes


@pytest.fixture
def young_collections() -> Iterator[list[int]]:
    """Young-generation collections counted while the test runs; the collector's settings are
    restored afterwards."""
    threshold = gc.get_threshold()
    seen: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 0:
            seen.append(1)

    gc.callbacks.append(count)
    yield seen
    gc.callbacks.remove(count)
    gc.set_threshold(*threshold)


def _records(n: int) -> list[_Record]:
    events = generate(Workload(connections=n // 10, activities_per_connection=9, seed=3))
    return [_Record(0, i, record_key(e), encode(e)) for i, e in enumerate(events)]


def _two_batches_held(records: list[_Record]) -> list[object]:
    """What a projector holds at once: a batch being written and the next, prepared."""
    held: list[object] = []
    for first in (0, BATCH):
        batch = Batch({0: first})
        batch.add(0, records[first : first + BATCH])
        held += [records[first : first + BATCH], batch, batch.fold(), batch.fold_nodes()]
    return held


def test_the_threshold_grows_with_the_batch_and_is_bounded() -> None:
    assert gen0_threshold(1) == BATCH_GEN0_THRESHOLD
    assert gen0_threshold(20_000) > gen0_threshold(10_000) > BATCH_GEN0_THRESHOLD
    assert gen0_threshold(10**9) == gen0_threshold(10**8)


@pytest.mark.parametrize(
    ("threshold", "collected"),
    [(gen0_threshold(BATCH), False), (BATCH // 2, True)],
    ids=["gen0_threshold", "below_the_batch"],
)
def test_young_collections_while_two_batches_are_held(
    young_collections: list[int], threshold: int, collected: bool
) -> None:
    records = _records(2 * BATCH)
    gc.collect()
    gc.set_threshold(threshold, *gc.get_threshold()[1:])
    young_collections.clear()
    held = _two_batches_held(records)
    assert bool(young_collections) is collected
    del held
