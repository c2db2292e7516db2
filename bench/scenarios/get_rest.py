"""Figure 3c: Get over the REST mapping (api/transport/rest.py) beside Get over gRPC, on the same
`conntrack-api serve` process (one worker, CONNTRACK_API_REST_PORT set) over the same PostgreSQL
read model: QPS, p50, p99 and server CPU per call, closed loop at the Get concurrency.

Both are driven by Python client processes (bench/loadgen.py's, grpc.aio for gRPC, an
aiohttp.ClientSession with keep-alive for REST) so the two figures share a client cost; the
gRPC one is therefore not figure 3's when ghz drives that. The client runs on the same machine
and takes cores from the server: on a small machine both figures are what the server gets of
what the clients leave, and the ratio is the informative number."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import urllib.parse
from collections import Counter
from typing import Any

import aiohttp

from bench.config import BenchConfig
from bench.infra import fresh_database
from bench.loadgen import LoadGenerator, LoadResult, _python_load
from bench.results import Figure, ScenarioResult
from bench.scenarios.get import (
    MIN_OK_FRACTION,
    populate_open_connections,
    sample_ids,
)
from bench.services import Service, api_service, free_port, running, wait_grpc_serving

CONNECTIONS = "/apigateways/websocket/v1/connections/"

# (latencies in seconds, status counts, wall seconds, CPU seconds) of one client process
_WorkerResult = tuple[list[float], dict[str, int], float, float]


def _rest_worker(
    base: str,
    ids: list[str],
    concurrency: int,
    seconds: float,
    rps: float | None,
    results: multiprocessing.Queue[_WorkerResult],
    ready: Any,
    go: Any,
) -> None:
    results.put(asyncio.run(_rest_loop(base, ids, concurrency, seconds, ready, go)))


async def _rest_loop(
    base: str, ids: list[str], concurrency: int, seconds: float, ready: Any, go: Any
) -> _WorkerResult:
    urls = [base + CONNECTIONS + urllib.parse.quote(i, safe="") for i in ids]
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async with session.get(base + "/openapi.json") as warm:  # the connection pool's first
            await warm.read()
        await asyncio.to_thread(ready.wait, 60)
        await asyncio.to_thread(go.wait, 60)
        started = time.perf_counter()
        cpu_started = time.process_time()
        deadline = started + seconds

        async def slot(k: int) -> None:
            i = k
            while True:
                sent = time.perf_counter()
                if sent >= deadline:
                    return
                try:
                    async with session.get(urls[i % len(urls)]) as response:
                        await response.read()
                        status = response.status
                    if status == 200:
                        latencies.append(time.perf_counter() - sent)
                        codes["OK"] += 1
                    else:
                        codes[f"HTTP {status}"] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    codes[type(exc).__name__] += 1
                i += concurrency

        await asyncio.gather(*(slot(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
        return latencies, dict(codes), elapsed, time.process_time() - cpu_started


async def _run(
    lg: LoadGenerator,
    server: Service,
    target: str,
    ids: list[str],
    cfg: BenchConfig,
    seconds: float,
    rest: bool,
) -> LoadResult:
    return await asyncio.to_thread(
        _python_load,
        target,
        ids,
        cfg.get_concurrency,
        seconds,
        None,
        lg.processes,
        {"server": server.pid},
        _rest_worker if rest else None,
    )


async def run(cfg: BenchConfig, result: ScenarioResult) -> None:
    lg = LoadGenerator(None, cfg.loadgen_processes, cfg.work_dir)
    result.params.update(
        rows=cfg.get_rows,
        concurrency=cfg.get_concurrency,
        seconds_per_run=cfg.get_seconds,
        load_generator=f"python x{lg.processes} processes (grpc.aio / aiohttp)",
    )
    async with fresh_database(cfg, "get_rest") as url:
        ids = sample_ids(await populate_open_connections(url, cfg.get_rows, cfg.seed), cfg.seed)
        target = f"127.0.0.1:{free_port()}"
        rest_port = free_port()
        base = f"http://127.0.0.1:{rest_port}"
        extra = {"CONNTRACK_API_REST_PORT": str(rest_port)}
        async with running(api_service(url, target, cfg.work_dir / "logs", extra)) as server:
            await wait_grpc_serving(target, server)
            loads: dict[str, LoadResult] = {}
            # Warm both paths, then measure them one after the other on the same process.
            for name, where, rest in (("gRPC", target, False), ("REST", base, True)):
                await _run(lg, server, where, ids, cfg, min(1.0, cfg.get_seconds), rest)
                load = await _run(lg, server, where, ids, cfg, cfg.get_seconds, rest)
                server.check_alive()
                if load.ok_fraction < MIN_OK_FRACTION:
                    raise RuntimeError(
                        f"{name} Get answered only {load.ok_fraction:.1%} OK "
                        f"({load.statuses}):\n{server.log_tail()}"
                    )
                assert load.cpu is not None
                result.cpu[f"conntrack-api {name} max"] = {
                    **load.cpu.as_dict(),
                    "load generator": round(load.client_cpu_cores, 3),
                }
                result.params.setdefault("runs", []).append({"path": name, **load.as_dict()})
                loads[name] = load
    rest_load, grpc_load = loads["REST"], loads["gRPC"]
    c = cfg.get_concurrency
    same = "gRPC Get, same server"
    for key, label, rest_value, grpc_value, unit in (
        ("rest_qps", f"REST Get QPS at concurrency {c}", rest_load.qps, grpc_load.qps, "QPS"),
        ("rest_p50_ms", "REST Get p50", rest_load.p50_ms, grpc_load.p50_ms, "ms"),
        ("rest_p99_ms", "REST Get p99", rest_load.p99_ms, grpc_load.p99_ms, "ms"),
    ):
        result.add(Figure(key, label, rest_value, unit, grpc_value, same))
    rest_cpu = result.cpu["conntrack-api REST max"]["server"]
    grpc_cpu = result.cpu["conntrack-api gRPC max"]["server"]
    result.add(
        Figure(
            "rest_server_cpu_ms_per_call",
            "server CPU per REST Get",
            1000 * rest_cpu / rest_load.qps if rest_load.qps else 0.0,
            "ms",
            1000 * grpc_cpu / grpc_load.qps if grpc_load.qps else None,
            same,
        )
    )
