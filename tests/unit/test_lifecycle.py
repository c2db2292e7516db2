"""conntrack.core.process.tune_gc: what the commands do to the garbage collector."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from conntrack.core.process import tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_what_exists_and_raises_the_young_threshold() -> None:
    _, gen1, gen2 = gc.get_threshold()
    gc.unfreeze()
    tune_gc(None, default=50_000)
    assert gc.get_threshold() == (50_000, gen1, gen2)
    assert gc.get_freeze_count() > 0
    # Objects made afterwards are collected as usual, cycles included.
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_zero_leaves_the_collector_alone() -> None:
    gc.unfreeze()
    threshold = gc.get_threshold()
    tune_gc(0, default=50_000)
    assert gc.get_threshold() == threshold
    assert gc.get_freeze_count() == 0


@pytest.mark.usefixtures("restored_gc")
def test_the_setting_wins_over_the_commands_default() -> None:
    _, gen1, gen2 = gc.get_threshold()
    tune_gc(1234, default=50_000)
    assert gc.get_threshold() == (1234, gen1, gen2)
