"""Open-loop pacing, shared by the load generators (bench/loadgen.py's Python Get load, the
soak's Get load): `concurrency` slots, each calling on its own schedule, staggered, so the
calls start at `rate` per second in total whatever each one takes (a slow answer does not
delay the next call of the other slots)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def paced(
    concurrency: int,
    rate: float | None,
    started: float,
    deadline: float,
    call: Callable[[int], Awaitable[None]],
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Run `call(i)` from `concurrency` slots until `deadline` (on `clock`, as `started` is):
    slot k makes calls k, k + concurrency, ...; with `rate` None each slot calls again as soon
    as its call returns (closed loop)."""
    interval = concurrency / rate if rate else 0.0

    async def slot(k: int) -> None:
        i = k
        next_at = started + interval * k / concurrency
        while True:
            if interval:
                delay = next_at - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
            if clock() >= deadline:
                return
            await call(i)
            i += concurrency

    await asyncio.gather(*(slot(k) for k in range(concurrency)))
