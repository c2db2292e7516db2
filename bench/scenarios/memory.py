"""Figure 5: peak resident memory (VmHWM) of `conntrack-projector` while it folds 1M live
connections into the read model, and of `conntrack-api serve` answering Get over them.

Both run as subprocesses; their peaks are read from /proc just before they are stopped. The
reference beside them is the read model's own size in PostgreSQL (table + indexes): a process
near that size would be holding the read model in memory."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from bench.config import BenchConfig
from bench.infra import (
    asyncpg_dsn,
    end_offsets,
    fresh_database,
    fresh_topics,
    projector_settings,
    settings_environment,
)
from bench.results import Figure, ScenarioResult, TargetCheck
from bench.scenarios.freshness import stored_positions
from bench.scenarios.get import load_generator
from bench.services import api_service, free_port, projector_service, running, wait_grpc_serving
from bench.workloads import connected_only, publish_records

PROJECTOR_TARGET_MB = 300.0
API_TARGET_MB = 200.0
TARGET_CONNECTIONS = 1_000_000


async def _read_model(database_url: str) -> tuple[int, float, list[str]]:
    """(open connections, MB the table takes with its indexes, a sample of 10k open ids)."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute("ANALYZE connections")
        count = await conn.fetchval(
            "SELECT count(*) FROM connections "
            "WHERE connected_at_ns IS NOT NULL AND disconnected_at_ns IS NULL"
        )
        size = await conn.fetchval("SELECT pg_total_relation_size('connections')")
        rows = await conn.fetch(
            "SELECT connection_id FROM connections ORDER BY md5(connection_id) LIMIT 10000"
        )
        return int(count), size / 1e6, [r["connection_id"] for r in rows]
    finally:
        await conn.close()


async def run(cfg: BenchConfig, result: ScenarioResult) -> None:
    connections = cfg.memory_connections
    mix = connected_only(connections, cfg.seed)
    log_dir = cfg.work_dir / "logs"
    lg = load_generator(cfg)
    async with fresh_topics(cfg, "memory") as (topic, dlq), fresh_database(cfg, "memory") as url:
        count = await publish_records(cfg.kafka, topic, mix.iter_records())
        end = await end_offsets(cfg.kafka, topic, cfg.partitions)
        settings = projector_settings(cfg, topic, dlq, url)
        timeout = max(120.0, count / 1000)
        async with running(projector_service(settings_environment(settings), log_dir)) as proj:
            started = time.perf_counter()
            while await stored_positions(url, topic) != end:
                proj.check_alive()
                if time.perf_counter() - started > timeout:
                    raise TimeoutError(f"projector not caught up after {timeout:.0f}s")
                await asyncio.sleep(0.25)
            projected_in = time.perf_counter() - started
            projector_peak = proj.peak_rss_mb()
            projector_now = proj.rss_mb()
        live, table_mb, ids = await _read_model(url)
        if live != connections:
            raise RuntimeError(
                f"expected {connections} live connections, the read model has {live}"
            )
        target = f"127.0.0.1:{free_port()}"
        async with running(api_service(url, target, log_dir)) as api:
            await wait_grpc_serving(target, api)
            api_idle = api.rss_mb()
            load = await lg.run(target, ids, cfg.get_concurrency, cfg.memory_get_seconds)
            api.check_alive()
            api_peak = api.peak_rss_mb()
    if projector_peak is None or api_peak is None:
        raise RuntimeError("could not read VmHWM from /proc")
    result.params.update(
        live_connections=live,
        projected_seconds=round(projected_in, 2),
        projector_rss_at_end_mb=projector_now,
        api_rss_idle_mb=api_idle,
        api_load={
            "seconds": round(load.seconds, 2),
            "qps": round(load.qps),
            "statuses": load.statuses,
        },
        load_generator=lg.name,
    )
    reference = "read model in PostgreSQL"
    projector_fig = result.add(
        Figure(
            "projector_peak_rss_mb",
            f"projector peak RSS, {live:,} live",
            projector_peak,
            "MB",
            table_mb,
            reference,
        )
    )
    api_fig = result.add(
        Figure(
            "api_peak_rss_mb",
            f"API peak RSS, {live:,} live, under Get load",
            api_peak,
            "MB",
            table_mb,
            reference,
        )
    )
    full = live >= TARGET_CONNECTIONS
    for fig, limit, name in (
        (projector_fig, PROJECTOR_TARGET_MB, "projector"),
        (api_fig, API_TARGET_MB, "API"),
    ):
        result.targets.append(
            TargetCheck(
                f"{name} RSS <= {limit:.0f} MB at 1M live connections",
                f"{fig.value:.0f} MB",
                fig.value <= limit if full else None,
                "" if full else f"only {live:,} live connections",
            )
        )
