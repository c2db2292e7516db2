"""Ways of reading a pre-loaded topic from the beginning, timed: the raw consume ceiling, the
decode+fold ceiling, the naive projector, and the real Projector until it has caught up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.infra import settings_environment
from bench.procstat import CpuUse, CpuWindow
from bench.services import projector_service
from conntrack.audit.log import LogReader
from conntrack.audit.rebuild import Rebuild
from conntrack.core.database import create_engine
from conntrack.core.events import decode, decode_record_tuple
from conntrack.core.fold import fold, fold_tuples
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.projector.runner import Projector

# The Projector's own consumer settings (projector/runner.py), so the ceilings read the same way.
FETCH_BYTES = 4 * 1024 * 1024
MAX_RECORDS = 5000


@dataclass(frozen=True)
class Timed:
    events: int
    seconds: float
    cpu: CpuUse | None = None

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


async def _from_beginning(bootstrap: str, topic: str, partitions: int) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=FETCH_BYTES,
    )
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return consumer


async def _drain(
    bootstrap: str,
    topic: str,
    partitions: int,
    total: int,
    on_batch: Callable[[dict[TopicPartition, list[Any]]], Awaitable[None] | None] | None,
    timeout_s: float,
) -> Timed:
    consumer = await _from_beginning(bootstrap, topic, partitions)
    try:
        cpu = CpuWindow()
        started = time.perf_counter()
        seen = 0
        while seen < total:
            batch = await consumer.getmany(timeout_ms=100, max_records=MAX_RECORDS)
            for records in batch.values():
                seen += len(records)
            if on_batch is not None:
                pending = on_batch(batch)
                if pending is not None:
                    await pending
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"read {seen} of {total} records in {timeout_s:.0f}s")
        return Timed(seen, time.perf_counter() - started, cpu.finish())
    finally:
        await consumer.stop()


async def raw_consume(
    bootstrap: str, topic: str, partitions: int, total: int, timeout_s: float = 300
) -> Timed:
    """aiokafka alone: getmany() in a loop, records counted and dropped (no decoding)."""
    return await _drain(bootstrap, topic, partitions, total, None, timeout_s)


async def decode_and_fold(
    bootstrap: str, topic: str, partitions: int, total: int, timeout_s: float = 300
) -> Timed:
    """What the projector does before the database, with the projector's own functions:
    decode every record (decode_record_tuple), fold each batch (fold_tuples)."""

    def work(batch: dict[TopicPartition, list[Any]]) -> None:
        fold_tuples(
            [decode_record_tuple(r.value, r.key) for records in batch.values() for r in records]
        )

    return await _drain(bootstrap, topic, partitions, total, work, timeout_s)


async def naive_projector(
    bootstrap: str,
    topic: str,
    partitions: int,
    database_url: str,
    limit: int,
    seconds_cap: float,
) -> Timed:
    """The obvious projector: one transaction per event (same store, same fence, same fold).
    Runs over the first `limit` records or `seconds_cap` seconds, whichever ends first."""
    engine = create_engine(database_url)
    store = ProjectionStore(engine)
    consumer = await _from_beginning(bootstrap, topic, partitions)
    try:
        expected = await store.positions(topic, range(partitions))
        cpu = CpuWindow()
        started = time.perf_counter()
        done = 0
        while done < limit and time.perf_counter() - started < seconds_cap:
            batch = await consumer.getmany(timeout_ms=100, max_records=500)
            for tp, records in batch.items():
                for r in records:
                    if done >= limit or time.perf_counter() - started >= seconds_cap:
                        break
                    states = fold([decode(r.value, r.key)])
                    advance = {tp.partition: (expected[tp.partition], r.offset + 1)}
                    await store.apply_batch(topic, advance, states)
                    expected[tp.partition] = r.offset + 1
                    done += 1
        return Timed(done, time.perf_counter() - started, cpu.finish())
    finally:
        await consumer.stop()
        await engine.dispose()


@dataclass(frozen=True)
class CatchUp:
    """A Projector run from an empty read model to the end of a pre-loaded topic."""

    events: int
    total_seconds: float  # from constructing the Projector to caught up
    assignment_seconds: float  # of which: starting, joining the group, reading positions
    cpu: CpuUse
    rows: int

    @property
    def applying_seconds(self) -> float:
        return self.total_seconds - self.assignment_seconds

    @property
    def rate(self) -> float:
        return self.events / self.applying_seconds if self.applying_seconds > 0 else 0.0


async def projector_catch_up(
    settings: Settings,
    partitions: int,
    end: dict[int, int],
    timeout_s: float,
    pg_bulk: str = "copy",
) -> CatchUp:
    """Run the real Projector in this process until its stored positions reach `end`; then
    check the database agrees (positions and a row count). pg_bulk: the store's way of
    writing a batch to PostgreSQL (core/store.py, PG_BULK_PATHS)."""
    engine = create_engine(settings.database_url)
    store = ProjectionStore(engine, pg_bulk=pg_bulk)
    try:
        started = time.perf_counter()
        projector = Projector(settings, store)
        async with projector:
            task = asyncio.create_task(projector.run())
            try:
                assigned_at: float | None = None
                cpu: CpuWindow | None = None
                while True:
                    now = time.perf_counter()
                    if task.done():
                        task.result()  # raises what stopped it
                        raise RuntimeError("the projector stopped before catching up")
                    owned = projector.owned_positions
                    if assigned_at is None and len(owned) == partitions:
                        assigned_at, cpu = now, CpuWindow()
                    if owned == end:
                        break
                    if now - started > timeout_s:
                        raise TimeoutError(
                            f"projector not caught up after {timeout_s:.0f}s: at {owned}, end {end}"
                        )
                    await asyncio.sleep(0.005)
                caught_up = time.perf_counter()
                assert assigned_at is not None
                assert cpu is not None
                use = cpu.finish()
            finally:
                await projector.stop()
                await asyncio.wait_for(task, 60)
        stored = await store.all_positions()
        mine = {p: o for (t, p), o in stored.items() if t == settings.events_topic}
        if mine != end:
            raise RuntimeError(f"stored positions {mine} differ from the end offsets {end}")
        return CatchUp(
            events=sum(end.values()),
            total_seconds=caught_up - started,
            assignment_seconds=assigned_at - started,
            cpu=use,
            rows=await store.count(),
        )
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class Rebuilt:
    """`conntrack-audit rebuild` (audit.rebuild.Rebuild) from an empty read model to the end
    of a pre-loaded topic, switch included."""

    events: int
    seconds: float
    cpu: CpuUse
    rows: int

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


async def rebuild(bootstrap: str, topic: str, database_url: str) -> Rebuilt:
    """Run the rebuild command's code in this process, from constructing its log reader to
    the committed switch; then check the live read model holds the rows."""
    engine = create_engine(database_url)
    try:
        started = time.perf_counter()
        cpu = CpuWindow()
        async with LogReader(bootstrap, topic) as reader:
            result = await Rebuild(engine, reader).run()
        seconds = time.perf_counter() - started
        use = cpu.finish()
        if result.invalid:
            raise RuntimeError(f"the rebuild found {result.invalid} invalid records")
        return Rebuilt(result.events, seconds, use, await ProjectionStore(engine).count())
    finally:
        await engine.dispose()


async def processes_catch_up(
    settings: Settings,
    end: dict[int, int],
    processes: int,
    log_dir: Path,
    timeout_s: float,
) -> Timed:
    """`processes` `conntrack-projector` subprocesses in one consumer group (they split the
    partitions), from starting them to their stored positions reaching `end`: start-up and
    group joins (the second member's join makes the group rebalance) are included, as they are
    for an operator who scales out."""
    env = settings_environment(settings)
    services = [projector_service(env, log_dir) for _ in range(processes)]
    engine = create_engine(settings.database_url)
    store = ProjectionStore(engine)
    try:
        started = time.perf_counter()
        for service in services:
            await service.start()
        cpu = CpuWindow({f"projector {i + 1}": s.pid for i, s in enumerate(services)})
        while True:
            for service in services:
                service.check_alive()
            stored = await store.all_positions()
            if {p: o for (t, p), o in stored.items() if t == settings.events_topic} == end:
                break
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(
                    f"{processes} projector processes not caught up after {timeout_s:.0f}s"
                )
            await asyncio.sleep(0.02)
        return Timed(sum(end.values()), time.perf_counter() - started, cpu.finish())
    finally:
        for service in services:
            await service.stop()
        await engine.dispose()
