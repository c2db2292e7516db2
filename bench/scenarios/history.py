"""Figure 12: answers in time at 7 days of history of 1M connections a day (--scale shrinks the
day), through `conntrack-api serve` over PostgreSQL: ListConnections with as_of (a first page,
and a page from a random key) and CountConnections with as_of at random moments of the week;
and the history's size on disk per million connections.

The history is filled straight with COPY as retention writes it (core/history_store.py,
history_rows: a row per hour a connection's interval touches, in day partitions): connections
arrive evenly, last an exponential time of mean 10 minutes, one in 50 for hours more; the
connections open at the end stay in `connections`. One node is seen throughout (one sighting
interval), so the node rules are judged and pass."""

from __future__ import annotations

import random
import time

import asyncpg
import grpc

from bench.config import BenchConfig
from bench.infra import asyncpg_dsn, fresh_database
from bench.results import Figure, ScenarioResult, at_most, percentile
from bench.services import api_service, free_port, running, wait_grpc_serving
from conntrack.api.application.directory import encode_page_token
from conntrack.api.read.repository import DirectoryFilter
from conntrack.core.fold import ConnectionState
from conntrack.core.history import BUCKETS_PER_DAY, DAY_NS, HOUR_NS
from conntrack.core.history_store import history_rows
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2 as pb
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2_grpc as pb_grpc
from conntrack.core.schema import LIVE
from conntrack.core.timeutil import to_timestamp

GATEWAY = "gw-history"
PER_DAY = 1_000_000
DAYS = 7
PAGE = 100
CALLS = 300
WARMUP = 30
PAGE_P99_TARGET_MS = 50.0
MINUTE = 60_000_000_000
_HISTORY_COLUMNS = tuple(c.name for c in LIVE.connection_history.columns)
_LIVE_COLUMNS = tuple(c.name for c in LIVE.connections.columns)


def per_day(cfg: BenchConfig) -> int:
    return max(2_000, round(PER_DAY * min(cfg.scale, 1.0)))


def week(rnd: random.Random, n_per_day: int, now: int) -> list[ConnectionState]:
    start = now - DAYS * DAY_NS
    out = []
    for i in range(n_per_day * DAYS):
        connected = start + rnd.randrange(DAYS * DAY_NS)
        duration = int(rnd.expovariate(1 / (10 * MINUTE))) + 1_000_000_000
        if rnd.random() < 0.02:
            duration += rnd.randrange(6 * 60 * MINUTE)
        ended = connected + duration
        cid = f"{rnd.getrandbits(64):016x}{i:08x}"
        out.append(
            ConnectionState(
                cid,
                GATEWAY,
                "10.0.0.1",
                "bench/1",
                connected,
                f"{cid}-c",
                connected,
                ended if ended < now else None,
                1000 if ended < now else None,
                "bye" if ended < now else None,
                f"{cid}-d" if ended < now else None,
                "n1",
                1,
                f"user-{rnd.randrange(100_000)}",
                None,
            )
        )
    return out


async def fill(database_url: str, states: list[ConnectionState], now: int) -> tuple[int, int]:
    """COPY the week: closed connections into day partitions of the history, open ones into
    `connections`. Returns (history rows, closed connections)."""
    closed = [s for s in states if s.disconnected_at_ns is not None]
    still_open = [s for s in states if s.disconnected_at_ns is None]
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        first_day = (now - (DAYS + 1) * DAY_NS) // DAY_NS
        for day in range(first_day, now // DAY_NS + 1):
            lo, hi = day * BUCKETS_PER_DAY, (day + 1) * BUCKETS_PER_DAY
            await conn.execute(
                f"CREATE TABLE connection_history_d{day} PARTITION OF connection_history "
                f"FOR VALUES FROM ({lo}) TO ({hi})"
            )
        rows = 0
        for i in range(0, len(closed), 100_000):
            chunk = history_rows(closed[i : i + 100_000])
            rows += len(chunk)
            await conn.copy_records_to_table(
                "connection_history",
                records=[tuple(r[c] for c in _HISTORY_COLUMNS) for r in chunk],
                columns=_HISTORY_COLUMNS,
            )
        await conn.copy_records_to_table("connections", records=still_open, columns=_LIVE_COLUMNS)
        await conn.execute(
            "INSERT INTO node_sightings VALUES ('n1', 1, $1, $2)", now - (DAYS + 1) * DAY_NS, now
        )
        await conn.execute("INSERT INTO history_since VALUES (1, 0)")
        await conn.execute(
            "INSERT INTO nodes (node_id, incarnation, started_at_ns, last_seen_ns, gateway_id) "
            "VALUES ('n1', 1, $1, $2, $3)",
            now - (DAYS + 1) * DAY_NS,
            now,
            GATEWAY,
        )
        await conn.execute("VACUUM ANALYZE connection_history")
        await conn.execute("VACUUM ANALYZE connections")
    finally:
        await conn.close()
    return rows, len(closed)


async def history_bytes(database_url: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return int(
            await conn.fetchval(
                "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits "
                "WHERE inhparent = 'connection_history'::regclass"
            )
        )
    finally:
        await conn.close()


async def run(cfg: BenchConfig, result: ScenarioResult) -> None:
    n = per_day(cfg)
    rnd = random.Random(cfg.seed)
    now = time.time_ns()
    states = week(rnd, n, now)
    ids = sorted(s.connection_id for s in states)
    result.params.update(connections_per_day=n, days=DAYS, page_size=PAGE, calls=CALLS)
    async with fresh_database(cfg, "history") as url:
        started = time.perf_counter()
        rows, closed = await fill(url, states, now)
        result.notes.append(
            f"{len(states):,} connections of {DAYS} days ({closed:,} closed, as {rows:,} history "
            f"rows) filled with COPY in {time.perf_counter() - started:.1f}s"
        )
        size = await history_bytes(url)
        result.add(
            Figure(
                "history_mb_per_million",
                "history on disk per million closed connections (rows and indexes)",
                size / closed * 1_000_000 / 2**20,
                "MiB",
                note=f"{size / 2**20:,.0f} MiB for {closed:,} connections in {rows:,} rows",
            )
        )
        target = f"127.0.0.1:{free_port()}"
        week_start = now - DAYS * DAY_NS + HOUR_NS

        def moment(r: random.Random) -> int:
            return week_start + r.randrange(now - week_start - MINUTE)

        async with running(api_service(url, target, cfg.work_dir / "logs")) as api:
            await wait_grpc_serving(target, api)
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.ConnectionDirectoryServiceStub(channel)
                figures: dict[str, list[float]] = {"first": [], "keyed": [], "count": []}
                listed = counted = 0
                for i in range(WARMUP + CALLS):
                    at = moment(rnd)
                    as_of = to_timestamp(at)
                    token = encode_page_token(DirectoryFilter(GATEWAY), f"{at}/{rnd.choice(ids)}")
                    # One call after another, each timed from when it is made (a grpc.aio call
                    # starts then).
                    begun = time.perf_counter()
                    page = await stub.ListConnections(
                        pb.ListConnectionsRequest(gateway_id=GATEWAY, page_size=PAGE, as_of=as_of),
                        timeout=30,
                    )
                    first = time.perf_counter() - begun
                    begun = time.perf_counter()
                    await stub.ListConnections(
                        pb.ListConnectionsRequest(
                            gateway_id=GATEWAY, page_size=PAGE, page_token=token, as_of=as_of
                        ),
                        timeout=30,
                    )
                    keyed = time.perf_counter() - begun
                    begun = time.perf_counter()
                    answer = await stub.CountConnections(
                        pb.CountConnectionsRequest(gateway_id=GATEWAY, as_of=as_of), timeout=30
                    )
                    count = time.perf_counter() - begun
                    if i >= WARMUP:
                        figures["first"].append(first)
                        figures["keyed"].append(keyed)
                        figures["count"].append(count)
                        listed += len(page.connections)
                        counted += answer.count
        for key, label in (
            ("first", f"ListConnections as_of, first page of {PAGE}"),
            ("keyed", f"ListConnections as_of, a page of {PAGE} from a random key"),
            ("count", "CountConnections as_of"),
        ):
            latencies = sorted(figures[key])
            result.add(
                Figure(f"{key}_p50_ms", f"{label}: p50", percentile(latencies, 50) * 1e3, "ms")
            )
            result.add(
                Figure(f"{key}_p99_ms", f"{label}: p99", percentile(latencies, 99) * 1e3, "ms")
            )
        result.notes.append(
            f"{listed / CALLS:.1f} connections on a first page and {counted / CALLS:,.0f} open "
            "at a moment, on average"
        )
        worst = max(percentile(sorted(figures[k]), 99) * 1e3 for k in ("first", "keyed", "count"))
        check = at_most(
            worst,
            PAGE_P99_TARGET_MS,
            f"as-of page and count p99 <= {PAGE_P99_TARGET_MS} ms at {DAYS} days of 1M "
            "connections a day",
            " ms",
        )
        if n < PER_DAY:
            check.met = None  # a size-bound target: judged at full size only
        result.targets.append(check)
