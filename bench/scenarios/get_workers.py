"""Figure 3b: Get QPS of `conntrack-api serve` with one worker process per core
(api/process/workers.py) beside the constant-answer server (bench/constant_server.py) with as many
processes on one port, under the same load generator, closed loop at the Get concurrency; and both
with one process in the same run, for the scaling factor.

Each server runs alone. The load generator runs on the same machine and needs cores too: on a
machine with few cores the figures show what the servers get of what the generator leaves."""

from __future__ import annotations

import sys

from bench.config import BenchConfig
from bench.infra import fresh_database
from bench.loadgen import LoadResult
from bench.results import Figure, ScenarioResult, TargetCheck
from bench.scenarios.get import (
    QPS_RATIO_TARGET,
    _measure,
    load_generator,
    populate_open_connections,
    sample_ids,
)
from bench.services import (
    Service,
    api_service,
    free_port,
    running,
    service_environment,
    wait_grpc_serving,
)
from conntrack.api.process.cores import available_cores


def constant_workers(listen: str, workers: int, cfg: BenchConfig) -> Service:
    argv = [sys.executable, "-m", "bench.constant_server", "--listen", listen]
    return Service(
        f"constant-server x{workers}",
        [*argv, "--workers", str(workers)],
        service_environment({}),
        cfg.work_dir / "logs",
    )


def api_workers(url: str, listen: str, workers: int, cfg: BenchConfig) -> Service:
    service = api_service(
        url, listen, cfg.work_dir / "logs", extra={"CONNTRACK_API_WORKERS": str(workers)}
    )
    service.name = f"conntrack-api x{workers}"
    return service


async def _max(
    service: Service, target: str, ids: list[str], cfg: BenchConfig, result: ScenarioResult
) -> LoadResult:
    lg = load_generator(cfg)
    async with running(service):
        await wait_grpc_serving(target, service, within_s=60.0)
        await lg.run(target, ids, cfg.get_concurrency, min(1.0, cfg.get_seconds))  # warm-up
        return await _measure(lg, service, target, ids, cfg, result, None)


async def run(cfg: BenchConfig, result: ScenarioResult) -> None:
    cores = available_cores()
    counts = sorted({1, cores})
    result.params.update(
        rows=cfg.get_rows,
        concurrency=cfg.get_concurrency,
        seconds_per_run=cfg.get_seconds,
        load_generator=load_generator(cfg).name,
        workers=counts,
    )
    const: dict[int, LoadResult] = {}
    api: dict[int, LoadResult] = {}
    async with fresh_database(cfg, "get_workers") as url:
        ids = sample_ids(await populate_open_connections(url, cfg.get_rows, cfg.seed), cfg.seed)
        for workers in counts:
            target = f"127.0.0.1:{free_port()}"
            server = constant_workers(target, workers, cfg)
            const[workers] = await _max(server, target, ids, cfg, result)
            target = f"127.0.0.1:{free_port()}"
            server = api_workers(url, target, workers, cfg)
            api[workers] = await _max(server, target, ids, cfg, result)
    c = cfg.get_concurrency
    for workers in counts:
        label = f"{workers} worker{'s' if workers > 1 else ''}"
        result.add(
            Figure(
                f"qps_{workers}_workers",
                f"Get QPS, {label}, concurrency {c}",
                api[workers].qps,
                "QPS",
                const[workers].qps,
                f"constant server, {label}",
            )
        )
        result.add(
            Figure(
                f"server_cpu_{workers}_workers",
                f"  server CPU, {label}",
                result.cpu[f"conntrack-api x{workers} max"]["server"],
                "cores",
                result.cpu[f"constant-server x{workers} max"]["server"],
                f"constant server, {label}",
            )
        )
    if cores > 1:
        result.add(
            Figure(
                "scaling",
                f"Get QPS {cores} workers / 1 worker",
                api[cores].qps / api[1].qps,
                "x",
                const[cores].qps / const[1].qps,
                "constant server's",
            )
        )
    ratio = api[cores].qps / const[cores].qps
    result.targets.append(
        TargetCheck(
            f">= 75% of the constant server's QPS, {cores} workers each",
            f"{ratio:.0%}",
            ratio >= QPS_RATIO_TARGET,
        )
    )
    generator = result.cpu[f"conntrack-api x{cores} max"].get("load generator")
    result.notes.append(
        f"{cores} cores available; the load generator used {generator} cores during the "
        f"{cores}-worker API run, on the same machine"
    )
