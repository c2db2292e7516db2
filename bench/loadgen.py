"""Get load at a fixed concurrency (closed loop) or a fixed rate: ghz if it is installed (a Go
load generator: far cheaper per call than any Python client), else several Python client
processes. Both count only OK answers into QPS and latency, and report the rest by status."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.api import annotations_pb2

from bench.pacing import paced
from bench.procstat import CpuUse, CpuWindow
from bench.results import percentile
from bench.services import REPO
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2,
    connection_service_pb2_grpc,
)

GET_METHOD = "yandex.cloud.serverless.apigateway.websocket.v1.ConnectionService.Get"
PROTO = "yandex/cloud/serverless/apigateway/websocket/v1/connection_service.proto"


@dataclass
class LoadResult:
    generator: str
    concurrency: int
    target_rps: float | None
    seconds: float
    ok: int
    statuses: dict[str, int]
    p50_ms: float
    p99_ms: float
    client_cpu_cores: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    cpu: CpuUse | None = None  # of the watched processes, over the load window

    @property
    def qps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok_fraction(self) -> float:
        total = sum(self.statuses.values())
        return self.ok / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator,
            "concurrency": self.concurrency,
            "target_rps": self.target_rps,
            "seconds": round(self.seconds, 3),
            "qps": round(self.qps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "statuses": self.statuses,
            "client_cpu_cores": round(self.client_cpu_cores, 3),
        }


def find_ghz(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if Path(explicit).exists() else None
    found = shutil.which("ghz")
    if found:
        return found
    gopath = os.environ.get("GOPATH") or str(Path.home() / "go")
    candidate = Path(gopath) / "bin" / "ghz"
    return str(candidate) if candidate.exists() else None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class LoadGenerator:
    def __init__(self, ghz: str | None, processes: int, work_dir: Path) -> None:
        self.ghz = ghz
        self.processes = max(1, processes)
        self.work_dir = work_dir

    @property
    def name(self) -> str:
        return f"ghz ({self.ghz})" if self.ghz else f"python grpc.aio x{self.processes} processes"

    async def run(
        self,
        target: str,
        ids: list[str],
        concurrency: int,
        seconds: float,
        rps: float | None = None,
        watch: Mapping[str, int] | None = None,
    ) -> LoadResult:
        """Closed loop at `concurrency` (rps None) or `rps` calls a second; CPU of the `watch`
        processes (name -> pid) is measured over exactly the load window."""
        if self.ghz:
            return await self._ghz(target, ids, concurrency, seconds, rps, watch or {})
        return await asyncio.to_thread(
            _python_load, target, ids, concurrency, seconds, rps, self.processes, watch or {}
        )

    async def _ghz(
        self,
        target: str,
        ids: list[str],
        concurrency: int,
        seconds: float,
        rps: float | None,
        watch: Mapping[str, int],
    ) -> LoadResult:
        assert self.ghz is not None
        # The requests, cycled through in order, go in on stdin.
        data = json.dumps([{"connection_id": i} for i in ids]).encode()
        argv = [
            self.ghz,
            "--insecure",
            "--proto",
            PROTO,
            "--import-paths",
            # The service's proto imports google/api/annotations.proto (its HTTP routes), as
            # googleapis-common-protos ships it (proto/generate.py finds it the same way).
            f".,{Path(annotations_pb2.__file__).parents[2]}",
            "--call",
            GET_METHOD,
            "--concurrency",
            str(concurrency),
            # Calls cut off by the end of the run are not failures of the server.
            "--duration-stop",
            "ignore",
            "-z",
            f"{max(seconds, 0.1):.3f}s",
            "--timeout",
            "5s",
            "--data-file",
            "/dev/stdin",
            "--format",
            "json",
        ]
        if rps:
            argv += ["--rps", str(max(1, round(rps)))]
        argv.append(target)
        cpu_before = _children_cpu()
        window = CpuWindow(watch)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=REPO / "proto",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate(data)
        use = window.finish()
        if proc.returncode != 0:
            raise RuntimeError(f"ghz failed ({proc.returncode}): {err.decode(errors='replace')}")
        report = json.loads(out)
        cpu = _children_cpu() - cpu_before
        wall = report["total"] / 1e9
        statuses = {str(k): int(v) for k, v in (report.get("statusCodeDistribution") or {}).items()}
        latency = {
            int(d["percentage"]): d["latency"] / 1e6
            for d in report.get("latencyDistribution") or []
        }
        return LoadResult(
            generator="ghz",
            concurrency=concurrency,
            target_rps=rps,
            seconds=wall,
            ok=statuses.get("OK", 0),
            statuses=statuses,
            p50_ms=latency.get(50, 0.0),
            p99_ms=latency.get(99, 0.0),
            client_cpu_cores=cpu / wall if wall > 0 else 0.0,
            errors={str(k): int(v) for k, v in (report.get("errorDistribution") or {}).items()},
            cpu=use,
        )


# (latencies in seconds, status counts, wall seconds, CPU seconds) of one worker process
_WorkerResult = tuple[list[float], dict[str, int], float, float]

# The Python fallback: worker processes, each an asyncio loop with its share of the in-flight
# calls, started together on a shared event so their windows coincide.


def _python_load(
    target: str,
    ids: list[str],
    concurrency: int,
    seconds: float,
    rps: float | None,
    processes: int,
    watch: Mapping[str, int],
    worker: Callable[..., None] | None = None,
) -> LoadResult:
    """worker: what each client process runs, with _worker's arguments (default: gRPC Gets;
    the REST scenario passes its HTTP client)."""
    ctx = multiprocessing.get_context("spawn")
    processes = min(processes, concurrency)
    results: multiprocessing.Queue[_WorkerResult] = ctx.Queue()
    ready = ctx.Barrier(processes + 1)
    go = ctx.Event()
    workers = []
    for w in range(processes):
        share = concurrency // processes + (1 if w < concurrency % processes else 0)
        worker_rps = rps / processes if rps else None
        p = ctx.Process(
            target=worker or _worker,
            args=(target, ids[w::processes] or ids, share, seconds, worker_rps, results, ready, go),
            daemon=True,
        )
        p.start()
        workers.append(p)
    try:
        ready.wait(timeout=60)
        window = CpuWindow(watch)
        go.set()
        collected = [results.get(timeout=seconds + 60) for _ in workers]
        use = window.finish()
    except Exception as exc:  # queue.Empty, BrokenBarrierError, a worker's own error
        raise RuntimeError(f"python load generator failed: {exc!r}") from exc
    finally:
        for p in workers:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    latencies = sorted(x for lat, _, _, _ in collected for x in lat)
    statuses: Counter[str] = Counter()
    for _, codes, _, _ in collected:
        statuses.update(codes)
    wall = max(elapsed for _, _, elapsed, _ in collected)
    client_cpu = sum(cpu for _, _, _, cpu in collected)
    return LoadResult(
        generator="python",
        concurrency=concurrency,
        target_rps=rps,
        seconds=wall,
        ok=statuses.get("OK", 0),
        statuses=dict(statuses),
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        client_cpu_cores=client_cpu / wall if wall > 0 else 0.0,
        cpu=use,
    )


def _worker(
    target: str,
    ids: list[str],
    concurrency: int,
    seconds: float,
    rps: float | None,
    results: multiprocessing.Queue[_WorkerResult],
    ready: Any,
    go: Any,
) -> None:
    results.put(asyncio.run(_worker_loop(target, ids, concurrency, seconds, rps, ready, go)))


async def _worker_loop(
    target: str,
    ids: list[str],
    concurrency: int,
    seconds: float,
    rps: float | None,
    ready: Any,
    go: Any,
) -> _WorkerResult:
    requests = [connection_service_pb2.GetConnectionRequest(connection_id=i) for i in ids]
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = connection_service_pb2_grpc.ConnectionServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 30)
        await asyncio.to_thread(ready.wait, 60)
        await asyncio.to_thread(go.wait, 60)
        started = time.perf_counter()
        cpu_started = time.process_time()

        async def get(i: int) -> None:
            sent = time.perf_counter()
            try:
                await stub.Get(requests[i % len(requests)], timeout=5)
                latencies.append(time.perf_counter() - sent)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1

        await paced(concurrency, rps, started, started + seconds, get)
        elapsed = time.perf_counter() - started
        return latencies, dict(codes), elapsed, time.process_time() - cpu_started
