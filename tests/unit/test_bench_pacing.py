"""bench/pacing.py: the open-loop schedule the Get loads share, and the latency figures."""

from __future__ import annotations

import asyncio
import time

from bench.pacing import paced
from bench.results import ScenarioResult, add_latency_figures, percentile


async def test_paced_calls_start_at_the_rate_each_index_once() -> None:
    calls: list[int] = []

    async def call(i: int) -> None:
        calls.append(i)
        await asyncio.sleep(0.01)  # within a slot's gap (4 / 200 s): the pace holds

    started = time.perf_counter()
    await paced(4, 200.0, started, started + 0.5, call)
    assert sorted(calls) == list(range(len(calls)))
    assert 80 <= len(calls) <= 101


async def test_closed_loop_without_a_rate() -> None:
    calls: list[int] = []

    async def call(i: int) -> None:
        calls.append(i)
        await asyncio.sleep(0.01)

    started = time.perf_counter()
    await paced(2, None, started, started + 0.1, call)
    assert 8 <= len(calls) <= 22
    assert sorted(calls) == list(range(len(calls)))


def test_latency_figures_beside_their_baseline() -> None:
    result = ScenarioResult("x")
    latencies = [float(v) for v in range(1, 101)]
    p99 = add_latency_figures(result, "delivery_", "Send", latencies, [0.5, 1.0], "kafka")
    assert [f.key for f in result.figures] == [
        "delivery_p50_ms",
        "delivery_p99_ms",
        "delivery_max_ms",
    ]
    assert p99.value == percentile(latencies, 99) == 99.0
    assert p99.ceiling == 1.0
    assert result.figure("delivery_max_ms").value == 100.0
    assert add_latency_figures(ScenarioResult("y"), "", "x", latencies, [], "").ceiling is None
