"""Figure 1d: the projector beside its two ceilings, per way of writing a batch to PostgreSQL
and per commit durability.

- the no-database ceiling: consume + decode + fold from Kafka, nothing written (as figure 1);
- the database-only ceiling: the same rows upserted without Kafka, the way the projector writes
  them: the topic's records (read beforehand, untimed) are cut into batches of the projector's
  size (CONNTRACK_BATCH_MAX_EVENTS), decoded and folded (untimed, core/batch.py's
  Batch as a rebuild does), then ProjectionStore.apply_batch() is timed over every batch, one
  after another, positions and all;
- the projector: projector.runner.Projector catching up on the same topic, as figure 1.

Each is run for every store path (core/store.py's PG_BULK_PATHS) and, when the
server commits synchronously, again with synchronous_commit = off set on the scenario's
database (ALTER DATABASE, so every session of the projector gets it). The server's settings as
a session of that database sees them are recorded beside each figure."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import asyncpg
from sqlalchemy.engine import make_url

from bench.config import BenchConfig
from bench.consumption import MAX_RECORDS, Timed, _from_beginning, decode_and_fold
from bench.consumption import projector_catch_up as catch_up
from bench.infra import asyncpg_dsn, fresh_database, fresh_topics, projector_settings
from bench.procstat import CpuWindow
from bench.results import Figure, ScenarioResult, TargetCheck
from bench.scenarios.projector import _timeout, load_mix
from bench.workloads import activity_heavy
from conntrack.core.batch import Batch
from conntrack.core.database import create_engine
from conntrack.core.fold import ConnectionState, NodeState
from conntrack.core.settings import settings_from
from conntrack.core.store import PG_BULK_PATHS, ProjectionStore

SHOWN = ("synchronous_commit", "fsync", "full_page_writes", "wal_level")
TARGET_RATIO = 0.8


async def server_settings(url: str) -> dict[str, str]:
    """SHOW of the settings that decide what a commit costs, as a session of this database
    sees them."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return {name: str(await conn.fetchval(f"SHOW {name}")) for name in SHOWN}
    finally:
        await conn.close()


async def set_synchronous_commit(url: str, value: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        name = make_url(url).database
        await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = {value}')
    finally:
        await conn.close()


@dataclass(frozen=True)
class _Prepared:
    advances: dict[int, tuple[int, int]]
    states: dict[str, ConnectionState]
    nodes: dict[str, NodeState]


async def _batches(
    bootstrap: str, topic: str, partitions: int, total: int, size: int
) -> list[_Prepared]:
    """The topic's records in the order getmany() hands them over, cut into batches of `size`
    records, each decoded and folded as the projector would."""
    consumer = await _from_beginning(bootstrap, topic, partitions)
    starts = dict.fromkeys(range(partitions), 0)
    out: list[_Prepared] = []
    pending: list[object] = []
    seen = 0

    def cut(records: list[object]) -> None:
        batch = Batch(starts)
        batch.add_records(records)
        for p, (_, new) in batch.advances.items():
            starts[p] = new
        out.append(_Prepared(batch.advances, batch.fold(), batch.fold_nodes()))

    try:
        while seen < total:
            got = await consumer.getmany(timeout_ms=100, max_records=MAX_RECORDS)
            for records in got.values():
                seen += len(records)
                pending.extend(records)
            while len(pending) >= size:
                cut(pending[:size])
                del pending[:size]
        if pending:
            cut(pending)
    finally:
        await consumer.stop()
    return out


async def store_only(
    url: str, topic: str, partitions: int, batches: list[_Prepared], pg_bulk: str
) -> Timed:
    """ProjectionStore.apply_batch() over prepared batches, one after another."""
    engine = create_engine(url)
    try:
        store = ProjectionStore(engine, pg_bulk=pg_bulk)
        await store.positions(topic, range(partitions))
        gc.collect()
        cpu = CpuWindow()
        started = time.perf_counter()
        for b in batches:
            await store.apply_batch(topic, b.advances, b.states, b.nodes)
        seconds = time.perf_counter() - started
        use = cpu.finish()
        events = sum(new - start for b in batches for start, new in b.advances.values())
        return Timed(events, seconds, use)
    finally:
        await engine.dispose()


def _cpu_per_event(timed: Timed) -> str:
    """The harness process's CPU per event in a window: on a machine busy with other work this
    moves far less than a rate does."""
    if timed.cpu is None or not timed.events:
        return "?"
    return f"{timed.cpu.cores['harness'] * timed.cpu.seconds / timed.events * 1e6:.1f}"


async def run(cfg: BenchConfig, result: ScenarioResult) -> None:
    mix = activity_heavy(cfg.throughput_events, cfg.seed)
    size = settings_from().batch_max_events
    async with fresh_topics(cfg, result.name) as (topic, dlq):
        end = await load_mix(cfg, mix, topic, result)
        total = sum(end.values())
        timeout = _timeout(total)
        batches = await _batches(cfg.kafka, topic, cfg.partitions, total, size)
        result.params.update(
            batch_max_events=size,
            batches=len(batches),
            rows_upserted=sum(len(b.states) for b in batches),
        )
        gc.collect()
        nodb = await decode_and_fold(cfg.kafka, topic, cfg.partitions, total, timeout)
        async with fresh_database(cfg, "settings") as url:
            server = await server_settings(url)
        modes = ["server"] if server["synchronous_commit"] == "off" else ["server", "off"]
        result.params["server_settings"] = server
        for mode in modes:
            for path in PG_BULK_PATHS:
                commit = server["synchronous_commit"] if mode == "server" else "off"
                label = f"{path}, synchronous_commit={commit}"
                async with fresh_database(cfg, f"db-{path}") as url:
                    if mode == "off":
                        await set_synchronous_commit(url, "off")
                    shown = await server_settings(url)
                    db = await store_only(url, topic, cfg.partitions, batches, path)
                async with fresh_database(cfg, f"proj-{path}") as url:
                    if mode == "off":
                        await set_synchronous_commit(url, "off")
                    run = await catch_up(
                        projector_settings(cfg, topic, dlq, url),
                        cfg.partitions,
                        end,
                        timeout,
                        pg_bulk=path,
                    )
                settings_note = ", ".join(f"{k}={v}" for k, v in shown.items())
                db_note = f"{settings_note}; harness CPU {_cpu_per_event(db)} µs/event"
                run_note = (
                    f"{settings_note}; harness CPU "
                    f"{_cpu_per_event(Timed(run.events, run.applying_seconds, run.cpu))} µs/event"
                    f" (no-database ceiling {_cpu_per_event(nodb)})"
                )
                key = f"{path}_{'server' if mode == 'server' else 'async'}"
                result.add(
                    Figure(
                        f"db_only_events_per_s_{key}",
                        f"database-only ceiling ({label})",
                        db.rate,
                        "events/s",
                        nodb.rate,
                        "consume+decode+fold, no database",
                        note=db_note,
                    )
                )
                ceiling = min(db.rate, nodb.rate)
                figure = result.add(
                    Figure(
                        f"projector_events_per_s_{key}",
                        f"  projector ({label})",
                        run.rate,
                        "events/s",
                        ceiling,
                        "the lower ceiling",
                        note=run_note,
                    )
                )
                assert figure.ratio is not None
                result.targets.append(
                    TargetCheck(
                        f">= {TARGET_RATIO:.0%} of the lower ceiling ({label})",
                        f"{figure.ratio:.0%}",
                        figure.ratio >= TARGET_RATIO,
                    )
                )
                result.cpu[f"database-only {key}"] = db.cpu.as_dict() if db.cpu else {}
                result.cpu[f"projector {key}"] = run.cpu.as_dict()
        result.cpu["no-database ceiling"] = nodb.cpu.as_dict() if nodb.cpu else {}
