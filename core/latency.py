"""A latency histogram for hot paths that are read by a scrape, not written to a metrics
library: an observation is one bisect and two additions (no lock: one event loop writes it),
and a scrape turns the cumulative buckets into a Prometheus histogram (gateway/metrics.py)."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Final

# Seconds; from a loopback broker's acknowledgement (about 1 ms) to the delivery timeouts.
LATENCY_BUCKETS_S: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass(frozen=True, slots=True)
class LatencySnapshot:
    """Cumulative counts per upper bound (the last bound is +Inf) and the sum of the seconds."""

    buckets: tuple[tuple[float, int], ...]
    sum_s: float

    @property
    def count(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0


class LatencyTally:
    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum_s = 0.0

    def observe(self, seconds: float) -> None:
        # A negative figure (clocks of two hosts) counts as zero rather than skewing the sum.
        seconds = max(seconds, 0.0)
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._sum_s += seconds

    def snapshot(self) -> LatencySnapshot:
        running = 0
        buckets = []
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            running += count
            buckets.append((bound, running))
        return LatencySnapshot(tuple(buckets), self._sum_s)
