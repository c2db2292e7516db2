"""Figure 7: the connection directory's page latency: ListConnections of 1,000-connection pages
of one gateway, through `conntrack-api serve` over PostgreSQL, at gateways of 1k, 100k and 1M
open connections (--scale shrinks the largest).

The read model is filled straight with COPY (not through Kafka: the figure is the API's, and
the rows are what the projector would have written). Beside the measured gateway the table holds
a tenth as many rows of other gateways and a tenth as many disconnected ones, so the index
serves more than one gateway and holds only open rows. Pages start at random keys (tokens made
as the server makes them), one call after another from one client: the latency a caller paging
through the directory sees. EXPLAIN (ANALYZE, BUFFERS) of one page at the largest size goes
into the notes."""

from __future__ import annotations

import random
import time

import asyncpg
import grpc
from sqlalchemy.dialects import postgresql

from bench.config import BenchConfig
from bench.infra import asyncpg_dsn, fresh_database
from bench.results import Figure, ScenarioResult, percentile
from bench.services import api_service, free_port, running, wait_grpc_serving
from conntrack.api.application.directory import encode_page_token
from conntrack.api.read.repository import DirectoryFilter, directory_page_statement
from conntrack.core.liveness import Liveness
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2 as pb
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2_grpc as pb_grpc

GATEWAY = "gw-directory"
PAGE = 1000
CALLS = 300
WARMUP = 20
SIZES = (1_000, 100_000, 1_000_000)
_COLUMNS = (
    "connection_id",
    "gateway_id",
    "source_ip",
    "user_agent",
    "connected_at_ns",
    "connected_event_id",
    "last_active_at_ns",
    "disconnected_at_ns",
)


def sizes(cfg: BenchConfig) -> list[int]:
    return sorted({max(1_000, round(n * cfg.scale)) if n == max(SIZES) else n for n in SIZES})


def _ids(rnd: random.Random, n: int) -> list[str]:
    return [f"{rnd.getrandbits(64):016x}" for _ in range(n)]


async def fill(database_url: str, open_in_gateway: int, seed: int) -> list[str]:
    """COPY the rows; returns the measured gateway's ids."""
    rnd = random.Random(seed)
    now = time.time_ns()
    connected = now - 60_000_000_000
    mine = _ids(rnd, open_in_gateway)
    others = _ids(rnd, max(1, open_in_gateway // 10))
    closed = _ids(rnd, max(1, open_in_gateway // 10))

    def rows(ids: list[str], gateway: str, disconnected: int | None) -> list[tuple[object, ...]]:
        return [
            (
                cid,
                gateway,
                "10.0.0.1",
                "bench/1",
                connected,
                f"{cid}-c",
                now,
                disconnected,
            )
            for cid in ids
        ]

    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        for chunk_start in range(0, len(mine), 200_000):
            chunk = mine[chunk_start : chunk_start + 200_000]
            await conn.copy_records_to_table(
                "connections", records=rows(chunk, GATEWAY, None), columns=_COLUMNS
            )
        await conn.copy_records_to_table(
            "connections", records=rows(others, "gw-other", None), columns=_COLUMNS
        )
        await conn.copy_records_to_table(
            "connections", records=rows(closed, GATEWAY, now), columns=_COLUMNS
        )
        await conn.execute(
            "INSERT INTO projection_offsets (topic, partition, next_offset) VALUES ($1, 0, $2)",
            "conntrack.events.v1",
            open_in_gateway,
        )
        await conn.execute("VACUUM ANALYZE connections")
    finally:
        await conn.close()
    return sorted(mine)


async def explain(database_url: str, after: str) -> str:
    live = Liveness.of_seconds(30).bounds({}, time.time_ns())
    statement = directory_page_statement(DirectoryFilter(GATEWAY), live, after, PAGE + 1)
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    sql = str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")
    finally:
        await conn.close()
    return "\n".join(r[0] for r in rows)


async def measure(target: str, ids: list[str], seed: int) -> tuple[list[float], int]:
    """Latencies (seconds) of CALLS page calls from random keys; the connections they listed."""
    rnd = random.Random(seed)
    where = DirectoryFilter(GATEWAY)
    latencies: list[float] = []
    listed = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ConnectionDirectoryServiceStub(channel)
        for i in range(WARMUP + CALLS):
            start_at = rnd.randrange(len(ids))
            token = encode_page_token(where, ids[start_at]) if start_at else ""
            request = pb.ListConnectionsRequest(
                gateway_id=GATEWAY, page_size=PAGE, page_token=token
            )
            started = time.perf_counter()
            page = await stub.ListConnections(request, timeout=30)
            elapsed = time.perf_counter() - started
            if i >= WARMUP:
                latencies.append(elapsed)
                listed += len(page.connections)
    return sorted(latencies), listed


async def run(cfg: BenchConfig, result: ScenarioResult) -> None:
    log_dir = cfg.work_dir / "logs"
    result.params.update(page_size=PAGE, calls=CALLS, sizes=sizes(cfg))
    for n in sizes(cfg):
        async with fresh_database(cfg, "directory") as url:
            started = time.perf_counter()
            ids = await fill(url, n, cfg.seed)
            result.notes.append(
                f"{n:,} open connections (+{n // 10:,} of another gateway, +{n // 10:,} "
                f"disconnected) filled with COPY in {time.perf_counter() - started:.1f}s"
            )
            target = f"127.0.0.1:{free_port()}"
            async with running(api_service(url, target, log_dir)) as api:
                await wait_grpc_serving(target, api)
                latencies, listed = await measure(target, ids, cfg.seed)
            label = f"{n:,}"
            result.add(
                Figure(
                    f"page_p50_ms_{n}",
                    f"ListConnections page of {PAGE}, gateway of {label}: p50",
                    percentile(latencies, 50) * 1000,
                    "ms",
                )
            )
            result.add(
                Figure(
                    f"page_p99_ms_{n}",
                    f"ListConnections page of {PAGE}, gateway of {label}: p99",
                    percentile(latencies, 99) * 1000,
                    "ms",
                    note=f"{listed / len(latencies):.0f} connections per page on average",
                )
            )
            if n == max(sizes(cfg)):
                plan = await explain(url, ids[len(ids) // 2])
                result.notes.append(f"EXPLAIN (ANALYZE, BUFFERS) at {label}:\n{plan}")
