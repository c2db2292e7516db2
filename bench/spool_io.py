"""python -m bench.spool_io: the durable spool's own I/O rate (producer/spool.py), no broker.

Puts N encoded Activity events into a Spool (yielding to the event loop every 100, as a
publisher does) until they are fsynced, then reads and acknowledges them in rounds of 1,000
(the replayer's round; one cursor fsync each). Standalone: not a `python -m bench run`
scenario; it prints its figures."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

from conntrack.core.events import Activity, Event, encode
from conntrack.producer.spool import Spool

_T0 = 1_764_300_000_000_000_000


async def measure(events: int) -> str:
    values = [
        encode(Event(f"{i:036d}", f"c{i % 1000}", "gw", _T0 + i, Activity(1)))
        for i in range(events)
    ]
    with tempfile.TemporaryDirectory() as directory:
        spool = Spool(directory, 1 << 30)
        await spool.open()
        started = time.perf_counter()
        for i, value in enumerate(values):
            assert spool.put(value)
            if i % 100 == 0:
                await asyncio.sleep(0)
        await spool.durable()
        put_s = time.perf_counter() - started
        started = time.perf_counter()
        done = 0
        while got := await spool.read(1000):
            await spool.ack(got[-1][0])
            done += len(got)
        read_s = time.perf_counter() - started
        await spool.close()
    return (
        f"{events} records of {len(values[0])} bytes: put until fsynced {events / put_s:,.0f}/s, "
        f"read + ack in rounds of 1,000 {done / read_s:,.0f}/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.spool_io", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    print(asyncio.run(measure(parser.parse_args().events)))


if __name__ == "__main__":
    main()
