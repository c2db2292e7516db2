"""Figure 3: Get throughput and latency of `conntrack-api serve` over a PostgreSQL read model,
beside the constant-answer server (bench/constant_server.py) under the same load generator.

Each server runs alone (never both at once) as a subprocess: first at fixed concurrency, closed
loop (the maximum it sustains: QPS, p50, p99, server CPU), then at a fixed rate of half the
constant server's maximum (the p99 target of the issue), then with one client calling one Get
after another (the latency a lone client sees).

`get-replica` runs the same figures with the API reading from a streaming replica of the server
(CONNTRACK_BENCH_GET_REPLICA_URL; else, for the project's own server, one that
`infra/postgres.sh replica up` starts for the scenario and stops after it, so that its WAL replay
takes no CPU from the other scenarios)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from bench.config import BenchConfig
from bench.infra import asyncpg_dsn, fresh_database
from bench.loadgen import LoadGenerator, LoadResult, find_ghz
from bench.results import Figure, ScenarioResult, TargetCheck, at_most
from bench.services import (
    Service,
    api_service,
    constant_service,
    free_port,
    running,
    wait_grpc_serving,
)
from bench.workloads import START_NS
from conntrack.core.fold import ConnectionState, fold
from conntrack.producer.simulator import Workload, generate

QPS_RATIO_TARGET = 0.75
HALF_LOAD_P99_TARGET_MS = 10.0
SAMPLE_IDS = 10_000
# Below this share of OK answers the figures would describe error handling, not Get.
MIN_OK_FRACTION = 0.99


def load_generator(cfg: BenchConfig) -> LoadGenerator:
    ghz = None if cfg.load_generator == "python" else find_ghz(cfg.ghz_path)
    if cfg.load_generator == "ghz" and ghz is None:
        raise RuntimeError(
            "--load-generator ghz but no ghz found: go install github.com/bojand/ghz/cmd/ghz@latest"
        )
    return LoadGenerator(ghz, cfg.loadgen_processes, cfg.work_dir)


async def populate_open_connections(database_url: str, connections: int, seed: int) -> list[str]:
    """Open connections written straight into the read model (COPY), as the projector would
    have folded them; returns their ids. Faster than projecting them, and Get cannot tell."""
    workload = Workload(
        connections=connections, activities_per_connection=1, disconnect_ratio=0.0, seed=seed
    )
    states = fold(generate(workload, START_NS))
    columns = list(ConnectionState._fields)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.copy_records_to_table(
            "connections", records=list(states.values()), columns=columns
        )
        # A plausible projection position, so the freshness header Get sends is not empty.
        await conn.executemany(
            "INSERT INTO projection_offsets (topic, partition, next_offset) VALUES ($1, $2, $3)",
            [("conntrack.events.v1", p, connections) for p in range(6)],
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return list(states)


INFRA_POSTGRES = Path(__file__).resolve().parents[2] / "infra" / "postgres.sh"


async def _infra_postgres(cfg: BenchConfig, *args: str, ok: tuple[int, ...] = (0,)) -> str:
    port = make_url(cfg.postgres_url).port or 5432
    process = await asyncio.create_subprocess_exec(
        "bash",
        str(INFRA_POSTGRES),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "CONNTRACK_PG_PORT": str(port)},
    )
    out, _ = await process.communicate()
    if process.returncode not in ok:
        raise RuntimeError(f"infra/postgres.sh {' '.join(args)}: {out.decode().strip()}")
    return out.decode().strip()


@contextlib.asynccontextmanager
async def _replica_server(cfg: BenchConfig) -> AsyncIterator[str]:
    """The replica's URL: CONNTRACK_BENCH_GET_REPLICA_URL's, else the running replica of the
    project's server (infra/postgres.sh), else a new one made for the scenario and removed
    after it."""
    if cfg.get_replica_url is not None:
        yield cfg.get_replica_url
        return
    if make_url(cfg.postgres_url).host not in ("127.0.0.1", "localhost"):
        raise RuntimeError(
            "no replica: set CONNTRACK_BENCH_GET_REPLICA_URL to a streaming replica of "
            f"{make_url(cfg.postgres_url).host}"
        )
    if "replica running" in await _infra_postgres(cfg, "replica", "status", ok=(0, 3)):
        yield await _infra_postgres(cfg, "replica", "url")
        return
    # A fresh base backup: a replica stopped since has usually lost the WAL it would need (the
    # primary keeps none for it), and the scenario leaves none behind.
    await _infra_postgres(cfg, "replica", "reset")
    try:
        await _infra_postgres(cfg, "replica", "up")
        yield await _infra_postgres(cfg, "replica", "url")
    finally:
        await _infra_postgres(cfg, "replica", "reset")


async def _replica(replica_url: str | None, url: str) -> dict[str, str]:
    """With a replica, the API's settings to read the scenario's database from it, once the
    replica has every row (else none: the API reads `url`)."""
    if replica_url is None:
        return {}
    server = make_url(replica_url)
    replica = make_url(url).set(host=server.host, port=server.port)
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await conn.fetchval("SELECT count(*) FROM connections")
    finally:
        await conn.close()
    deadline = asyncio.get_running_loop().time() + 120
    while True:
        try:
            conn = await asyncpg.connect(asyncpg_dsn(replica.render_as_string(False)))
            try:
                if await conn.fetchval("SELECT count(*) FROM connections") == rows:
                    break
            finally:
                await conn.close()
        except (asyncpg.PostgresError, OSError):
            pass  # the database or its tables have not been replayed yet
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"the replica {server.host}:{server.port} did not catch up")
        await asyncio.sleep(0.2)
    return {"CONNTRACK_API_READ_DATABASE_URLS": replica.render_as_string(False)}


def sample_ids(ids: list[str], seed: int, k: int = SAMPLE_IDS) -> list[str]:
    rng = random.Random(seed)
    return rng.sample(ids, min(k, len(ids)))


async def _measure(
    lg: LoadGenerator,
    server: Service,
    target: str,
    ids: list[str],
    cfg: BenchConfig,
    result: ScenarioResult,
    rps: float | None,
    concurrency: int | None = None,
) -> LoadResult:
    await wait_grpc_serving(target, server)
    concurrency = concurrency or cfg.get_concurrency
    load = await lg.run(
        target, ids, concurrency, cfg.get_seconds, rps, watch={"server": server.pid}
    )
    server.check_alive()
    what = "max" if rps is None else f"{rps:,.0f} rps"
    if concurrency != cfg.get_concurrency:
        what += f" at concurrency {concurrency}"
    assert load.cpu is not None
    result.cpu[f"{server.name} {what}"] = {
        **load.cpu.as_dict(),
        "load generator": round(load.client_cpu_cores, 3),
    }
    result.params.setdefault("runs", []).append({"server": server.name, **load.as_dict()})
    if load.ok_fraction < MIN_OK_FRACTION:
        raise RuntimeError(
            f"{server.name} answered only {load.ok_fraction:.1%} OK ({load.statuses}; "
            f"{load.errors}):\n{server.log_tail()}"
        )
    return load


async def run(cfg: BenchConfig, result: ScenarioResult) -> None:
    """Figure 3: the API reading from the server the scenario's database is on."""
    await _run(cfg, result, None)


async def run_on_replica(cfg: BenchConfig, result: ScenarioResult) -> None:
    """Figure 3b': the same, the API reading from a streaming replica of that server."""
    async with _replica_server(cfg) as replica_url:
        await _run(cfg, result, replica_url)


async def _run(cfg: BenchConfig, result: ScenarioResult, replica_url: str | None) -> None:
    lg = load_generator(cfg)
    result.params.update(
        rows=cfg.get_rows,
        concurrency=cfg.get_concurrency,
        seconds_per_run=cfg.get_seconds,
        load_generator=lg.name,
        read_replica=replica_url is not None,
    )
    log_dir = cfg.work_dir / "logs"
    async with fresh_database(cfg, "get") as url:
        ids = sample_ids(await populate_open_connections(url, cfg.get_rows, cfg.seed), cfg.seed)
        target = f"127.0.0.1:{free_port()}"
        async with running(constant_service(target, log_dir)) as server:
            await wait_grpc_serving(target, server)
            await lg.run(target, ids, cfg.get_concurrency, min(1.0, cfg.get_seconds))  # warm-up
            const_max = await _measure(lg, server, target, ids, cfg, result, None)
            half = const_max.qps / 2
            const_half = await _measure(lg, server, target, ids, cfg, result, half)
            const_one = await _measure(lg, server, target, ids, cfg, result, None, 1)
        target = f"127.0.0.1:{free_port()}"
        api = api_service(url, target, log_dir, await _replica(replica_url, url))
        async with running(api) as server:
            await wait_grpc_serving(target, server)
            await lg.run(target, ids, cfg.get_concurrency, min(1.0, cfg.get_seconds))
            api_max = await _measure(lg, server, target, ids, cfg, result, None)
            api_half = await _measure(lg, server, target, ids, cfg, result, half)
            api_one = await _measure(lg, server, target, ids, cfg, result, None, 1)
    c = cfg.get_concurrency
    const_label = "constant-answer server"
    qps = result.add(
        Figure("qps", f"Get QPS at concurrency {c}", api_max.qps, "QPS", const_max.qps, const_label)
    )
    result.add(
        Figure(
            "p50_ms",
            f"Get p50 at concurrency {c}",
            api_max.p50_ms,
            "ms",
            const_max.p50_ms,
            const_label,
        )
    )
    result.add(
        Figure(
            "p99_ms",
            f"Get p99 at concurrency {c}",
            api_max.p99_ms,
            "ms",
            const_max.p99_ms,
            const_label,
        )
    )
    p99_half = result.add(
        Figure(
            "p99_half_load_ms",
            f"Get p99 at {half:,.0f} rps (half the constant max)",
            api_half.p99_ms,
            "ms",
            const_half.p99_ms,
            const_label,
            note=f"achieved {api_half.qps:,.0f} rps",
        )
    )
    result.add(
        Figure(
            "half_load_qps", "  achieved rate at half load", api_half.qps, "QPS", half, "asked for"
        )
    )
    # One client calling one Get after another: what the batching window must not slow down.
    result.add(
        Figure(
            "p50_one_client_ms",
            "Get p50 at concurrency 1",
            api_one.p50_ms,
            "ms",
            const_one.p50_ms,
            const_label,
        )
    )
    api_cpu = result.cpu["conntrack-api max"]["server"]
    const_cpu = result.cpu["constant-server max"]["server"]
    result.add(
        Figure(
            "server_cpu_cores",
            "API server CPU at max load",
            api_cpu,
            "cores",
            const_cpu,
            const_label,
        )
    )
    result.add(
        Figure(
            "server_cpu_ms_per_call",
            "  server CPU per Get",
            1000 * api_cpu / api_max.qps,
            "ms",
            1000 * const_cpu / const_max.qps,
            const_label,
        )
    )
    assert qps.ratio is not None
    result.targets.append(
        TargetCheck(
            ">= 75% of the constant server's QPS", f"{qps.ratio:.0%}", qps.ratio >= QPS_RATIO_TARGET
        )
    )
    result.targets.append(
        at_most(p99_half.value, HALF_LOAD_P99_TARGET_MS, "p99 <= 10 ms at half that load", " ms")
    )
    if api_half.qps < 0.9 * half:
        result.notes.append(
            f"the API reached only {api_half.qps:,.0f} of the {half:,.0f} rps asked for at half "
            "load: its p99 there is a saturated figure"
        )
