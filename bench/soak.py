"""python -m bench soak: the whole system under steady load for a long time (default one hour),
one row of figures per interval (default one minute), then a verdict against the issue's bar.

What runs: `conntrack-projector` and `conntrack-api serve` as subprocesses (as in the other
scenarios), on a fresh topic and a fresh PostgreSQL database. Beside them:

- a paced producer (its own process): the simulator's churn traffic (producer/simulator.py,
  published in time order) held at `--rate` events/s by counting, each connection connecting,
  being active `ACTIVITIES` times and disconnecting, its parameters chosen so that simulated
  time runs at the speed of the wall clock;
- Get load at `--get-rate` calls/s over `--resident` connections that were published before
  the run and stay open, so every call should answer OK: one ghz run per interval when ghz is
  installed, else a Python client process for the whole run;
- freshness probes (this process): a Connected event of a fresh connection every
  1/`--probes-per-second` s through producer.publisher.Publisher, timed from publish until Get
  finds it (bench/scenarios/freshness.py's probes);
- a lag sampler (this process, every second): the log end summed over partitions minus the
  projector's stored positions (projection_offsets) summed the same way.

Each interval records the projector's and the API's RSS at its end, the events sent and
appended per second, lag (max, mean, at the end), freshness p50/p99 of the probes that became
visible in it, Get p50/p99 and statuses of the calls that completed in it, the CPU of each
process group, and the WARNING/ERROR lines (and tracebacks) the two services logged in it.
The JSON is rewritten after every interval, so an interrupted run keeps what it measured; the
PNG (matplotlib) is drawn at the end, beside the JSON.

The verdict (verdict(); BENCHMARKS.md, "Soak"): after the warm-up, the median RSS of the last N
intervals is less than 10% above the median of the first N (each service); lag does not trend
up (the median of the last N intervals' max lag is not above the first N's by more than both
the first N's own value and one second of traffic); no ERROR, CRITICAL or traceback in either
service's log over the whole run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import multiprocessing
import re
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg
import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.config import BenchConfig
from bench.infra import (
    asyncpg_dsn,
    fresh_database,
    fresh_topics,
    projector_settings,
    settings_environment,
)
from bench.loadgen import LoadGenerator, LoadResult
from bench.pacing import paced
from bench.procstat import CpuWindow, children, rss_mb
from bench.results import percentile
from bench.scenarios.freshness import PROBE_TIMEOUT_S, _Probes, wait_assigned
from bench.scenarios.get import load_generator
from bench.services import Service, api_service, free_port, projector_service, wait_grpc_serving
from conntrack.core.events import HEADERS, encode
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2,
    connection_service_pb2_grpc,
)
from conntrack.producer.publisher import Publisher
from conntrack.producer.simulator import Workload, generate

SCHEMA: Final = "conntrack-bench-soak/1"
RSS_GROWTH_LIMIT: Final = 0.10
# Each soak connection: connect, this many activities, disconnect (80% of events are activity).
ACTIVITIES: Final = 8
# Mean seconds between one connection's events: with ACTIVITIES a connection lives ~54 s, so
# about rate/10 x 54 connections are open at once (27,000 at 5,000 events/s) after the first
# minute.
EVENT_GAP_S: Final = 6.0
# After an interval ends, how long to wait for the Get results and lag samples of its last
# moments before the row is written.
SETTLE_S: Final = 1.0
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (WARNING|ERROR|CRITICAL) ")
_LOG_SAMPLES: Final = 5


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `1.5m` or `1h`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 20s, 1m, 1h)")
    seconds = float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return seconds


@dataclass(frozen=True)
class SoakParams:
    minutes: float = 60.0
    rate: int = 5_000
    get_rate: int = 500
    get_concurrency: int = 32
    interval_s: float = 60.0
    warmup_s: float | None = None  # None: 5 minutes, or a fifth of the run if that is shorter
    compare: int | None = None  # None: 5 intervals, fewer on a short run
    resident: int = 10_000
    probes_per_second: float = 5.0

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    @property
    def intervals(self) -> int:
        return max(1, math.ceil(self.seconds / self.interval_s - 1e-9))

    @property
    def warmup_intervals(self) -> int:
        warmup = self.warmup_s if self.warmup_s is not None else min(300.0, self.seconds / 5)
        return min(self.intervals - 1, math.ceil(warmup / self.interval_s - 1e-9))

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "intervals": self.intervals,
            "warmup_intervals": self.warmup_intervals,
        }


def steady_workload(rate: int, seconds: float, seed: int) -> Workload:
    """Churn at `rate` events/s in simulated time: each connection has ACTIVITIES + 2 events, so
    rate / (ACTIVITIES + 2) connect per second; enough connections for the whole run."""
    per_connection = ACTIVITIES + 2
    return Workload(
        gateways=3,
        connections=int(rate * (seconds + 120) / per_connection) + 1,
        activities_per_connection=ACTIVITIES,
        disconnect_ratio=1.0,
        seed=seed,
        connect_rate=rate / per_connection,
        activity_rate=1 / EVENT_GAP_S,
    )


# The verdict: pure functions of the interval rows.


def _median_ends(values: list[float], n: int) -> tuple[float, float]:
    return statistics.median(values[:n]), statistics.median(values[-n:])


def compare_window(params: SoakParams, measured: int) -> int:
    """N, the intervals at each end of the measured (after warm-up) part that are compared."""
    if params.compare is not None:
        return max(1, min(params.compare, measured // 2 or 1))
    return max(1, min(5, measured // 3))


def verdict(rows: list[dict[str, Any]], params: SoakParams) -> dict[str, Any]:
    measured = [r for r in rows if not r["warmup"]]
    n = compare_window(params, len(measured))
    out: dict[str, Any] = {"measured_intervals": len(measured), "compare_intervals": n}
    judgeable = len(measured) >= 2
    rss: dict[str, Any] = {}
    for name in ("projector", "api"):
        values = [r[f"{name}_rss_mb"] for r in measured if r[f"{name}_rss_mb"] is not None]
        if len(values) < 2:
            rss[name] = {"met": None, "note": "too few intervals after the warm-up"}
            continue
        first, last = _median_ends(values, n)
        growth = (last - first) / first if first else 0.0
        rss[name] = {
            "first_median_mb": round(first, 1),
            "last_median_mb": round(last, 1),
            "growth": round(growth, 4),
            "max_mb": round(max(values), 1),
            "met": growth < RSS_GROWTH_LIMIT,
        }
    out["rss"] = rss
    lags = [r["lag_max"] for r in measured if r["lag_max"] is not None]
    if len(lags) >= 2:
        first, last = _median_ends([float(v) for v in lags], n)
        slack = max(first, float(params.rate))  # its own size, and at least 1 s of traffic
        trends_up = last > first + slack
        out["lag"] = {
            "max": max(lags),
            "max_seconds_of_traffic": round(max(lags) / params.rate, 2),
            "first_median_of_max": first,
            "last_median_of_max": last,
            "trends_up": trends_up,
            "met": not trends_up,
        }
    else:
        out["lag"] = {"met": None, "note": "too few lag samples after the warm-up"}
    errors = sum(r["log"][s]["errors"] for r in rows for s in ("projector", "api"))
    warnings = sum(r["log"][s]["warnings"] for r in rows for s in ("projector", "api"))
    out["logs"] = {"errors": errors, "warnings": warnings, "met": errors == 0 if rows else None}
    checks = [rss[s]["met"] for s in rss] + [out["lag"]["met"], out["logs"]["met"]]
    out["met"] = None if not judgeable or None in checks else all(checks)
    return out


def verdict_lines(v: dict[str, Any], params: SoakParams) -> list[str]:
    def word(met: bool | None) -> str:
        return {True: "met", False: "NOT met", None: "n/a"}[met]

    n = v["compare_intervals"]
    lines = [
        f"verdict over {v['measured_intervals']} intervals after a warm-up of "
        f"{params.warmup_intervals} (median of the first {n} vs the last {n}):"
    ]
    for name, r in v["rss"].items():
        if r["met"] is None:
            lines.append(f"  {name} RSS growth < 10%: n/a ({r['note']})")
        else:
            lines.append(
                f"  {name} RSS growth < 10%: {word(r['met'])} ({r['first_median_mb']} -> "
                f"{r['last_median_mb']} MB, {r['growth'] * 100:+.1f}%; max {r['max_mb']} MB)"
            )
    lag = v["lag"]
    if lag["met"] is None:
        lines.append(f"  lag bounded: n/a ({lag['note']})")
    else:
        lines.append(
            f"  lag bounded: {word(lag['met'])} (max {lag['max']:,} records = "
            f"{lag['max_seconds_of_traffic']} s of traffic; median of interval max "
            f"{lag['first_median_of_max']:,.0f} -> {lag['last_median_of_max']:,.0f}, "
            f"{'trends up' if lag['trends_up'] else 'no upward trend'})"
        )
    logs = v["logs"]
    lines.append(
        f"  no ERROR in the logs: {word(logs['met'])} ({logs['errors']} error lines, "
        f"{logs['warnings']} warnings)"
    )
    lines.append(f"  overall: {word(v['met'])}")
    return lines


# Load, each in a process of its own so its Python work does not slow the measuring.


def _run_in_process(main: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
    """A load process's entry point: `main(*args)` on an event loop of its own."""
    asyncio.run(main(*args))


async def _produce_at_rate(
    bootstrap: str, topic: str, rate: int, seconds: float, seed: int, ready: Any, go: Any, sent: Any
) -> None:
    # Like the Publisher (and freshness's background traffic): idempotent, acks=all, 5 ms linger.
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    headers = list(HEADERS)
    try:
        ready.set()
        await asyncio.to_thread(go.wait, 120)
        events = generate(steady_workload(rate, seconds, seed), time.time_ns(), order="time")
        started = time.monotonic()
        count = 0
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(rate * elapsed)
            while count < due:
                event = next(events)
                await producer.send(
                    topic, value=encode(event), key=event.connection_id.encode(), headers=headers
                )
                count += 1
            sent.value = count
            await asyncio.sleep(0.005)
        await producer.flush()
    finally:
        await producer.stop()


# (completion time on the monotonic clock, latency in seconds or None, status name)
_Call = tuple[float, float | None, str]


async def _get_loop(
    target: str,
    ids: list[str],
    rps: float,
    concurrency: int,
    seconds: float,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    """Open loop at rps: each of `concurrency` slots calls on its own schedule (staggered), as
    bench/loadgen.py's Python generator does; the calls go to `out` in batches every 0.5 s."""
    requests = [connection_service_pb2.GetConnectionRequest(connection_id=i) for i in ids]
    batch: list[_Call] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = connection_service_pb2_grpc.ConnectionServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 30)
        ready.set()
        await asyncio.to_thread(go.wait, 120)
        started = time.monotonic()

        async def get(i: int) -> None:
            sent = time.monotonic()
            try:
                await stub.Get(requests[i % len(requests)], timeout=5)
                done = time.monotonic()
                batch.append((done, done - sent, "OK"))
            except grpc.aio.AioRpcError as exc:
                batch.append((time.monotonic(), None, exc.code().name))

        async def flush() -> None:
            while True:
                await asyncio.sleep(0.5)
                if batch:
                    out.put(batch[:])
                    batch.clear()

        flusher = asyncio.create_task(flush())
        try:
            await paced(concurrency, rps, started, started + seconds, get, clock=time.monotonic)
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        out.put(batch[:])


class _GhzLoad:
    """The Get load by ghz when it is installed (bench/loadgen.py; far cheaper per call than a
    Python client, so a busy machine starves it less): one run per interval, ending just before
    the interval does, so each run's p50/p99 and statuses are that interval's."""

    def __init__(
        self, generator: LoadGenerator, target: str, ids: list[str], params: SoakParams
    ) -> None:
        self._generator, self._target, self._ids, self._params = generator, target, ids, params
        self._results: dict[int, LoadResult] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self, start: float) -> None:
        self._task = asyncio.create_task(self._run(start))

    async def _run(self, start: float) -> None:
        p = self._params
        for k in range(p.intervals):
            seconds = start + (k + 1) * p.interval_s - time.monotonic() - 0.3
            self._results[k] = await self._generator.run(
                self._target, self._ids, p.get_concurrency, max(0.5, seconds), rps=p.get_rate
            )

    async def result(self, k: int) -> LoadResult:
        deadline = time.monotonic() + 30
        while k not in self._results:
            assert self._task is not None
            if self._task.done():
                self._task.result()  # raise why ghz stopped
                raise RuntimeError(f"no ghz run for interval {k}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ghz run of interval {k} did not finish")
            await asyncio.sleep(0.1)
        return self._results.pop(k)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# Watching, in this process.


class _Lag:
    """Every second: the log end summed over partitions, and that minus the projector's stored
    positions (records behind, summed over partitions)."""

    def __init__(self, bootstrap: str, database_url: str, topic: str, partitions: int) -> None:
        self._bootstrap, self._url, self._topic = bootstrap, database_url, topic
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.samples: list[tuple[float, int, int]] = []  # (time, log end, lag)
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one query at a time on the one connection

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap)
        await self._consumer.start()
        self._conn = await asyncpg.connect(asyncpg_dsn(self._url))
        self._task = asyncio.create_task(self._run())

    async def sample(self) -> tuple[float, int, int]:
        # Positions first: the log end read after them is at least as far, so lag is >= 0.
        async with self._lock:
            stored = await self._conn.fetchval(
                "SELECT coalesce(sum(next_offset), 0) FROM projection_offsets WHERE topic = $1",
                self._topic,
            )
            ends = await self._consumer.end_offsets(self._tps)
        end = sum(ends.values())
        point = (time.monotonic(), end, max(0, end - int(stored)))
        self.samples.append(point)
        return point

    async def _run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(1.0)

    def between(self, start: float, end: float) -> list[int]:
        return [lag for t, _, lag in self.samples if start <= t < end]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            await self._consumer.stop()
            await self._conn.close()


class _LogWatch:
    """New WARNING/ERROR/CRITICAL lines and tracebacks in a service's log since the last look."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self.samples: list[str] = []

    def scan(self) -> dict[str, int]:
        counts = {"errors": 0, "warnings": 0}
        try:
            with self._path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return counts
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            match = _LOG_LINE.match(line)
            if match:
                counts["warnings" if match[1] == "WARNING" else "errors"] += 1
            elif line.startswith("Traceback (most recent call last)"):
                counts["errors"] += 1  # printed without a log line: an error all the same
            else:
                continue
            if (match is None or match[1] != "WARNING") and len(self.samples) < _LOG_SAMPLES:
                self.samples.append(line[:300])
        return counts


def _tree_rss_mb(pid: int) -> float | None:
    """RSS of a process and its live children (`conntrack-api serve` with workers)."""
    values = [rss_mb(p) for p in (pid, *children(pid))]
    known = [v for v in values if v is not None]
    return round(sum(known), 1) if known else None


def _ms(values: list[float], pct: float) -> float | None:
    return round(percentile(sorted(values), pct) * 1000, 2) if values else None


async def _publish_resident(bootstrap: str, topic: str, count: int, seed: int) -> list[str]:
    """Connections that stay open through the run (the Get load's ids), published at once."""
    workload = Workload(
        connections=count, activities_per_connection=0, disconnect_ratio=0.0, seed=seed + 1
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    ids = []
    try:
        for event in generate(workload, time.time_ns()):
            ids.append(event.connection_id)
            await producer.send(
                topic, value=encode(event), key=event.connection_id.encode(), headers=list(HEADERS)
            )
        await producer.flush()
    finally:
        await producer.stop()
    return ids


def write_document(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


async def run(
    cfg: BenchConfig, params: SoakParams, meta: dict[str, Any], out: Path
) -> dict[str, Any]:
    log_dir = cfg.work_dir / "logs"
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "meta": meta,
        "params": {**params.as_dict(), "partitions": cfg.partitions},
        "complete": False,
        "intervals": [],
    }
    ctx = multiprocessing.get_context("spawn")
    seconds = params.intervals * params.interval_s
    async with (
        fresh_topics(cfg, "soak") as (topic, dlq),
        # The API's command channel needs its topics (it warns every few seconds without them),
        # though the soak sends no commands: a pair of fresh ones, as the events topic.
        fresh_topics(cfg, "soak-commands") as (commands, outcomes),
        fresh_database(cfg, "soak") as url,
    ):
        settings = projector_settings(cfg, topic, dlq, url)
        target = f"127.0.0.1:{free_port()}"
        text_logs = {"CONNTRACK_LOG_FORMAT": "text"}  # what _LogWatch reads
        projector = projector_service({**settings_environment(settings), **text_logs}, log_dir)
        api = api_service(
            url,
            target,
            log_dir,
            {
                **text_logs,
                "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS": cfg.kafka,
                "CONNTRACK_COMMANDS_TOPIC": commands,
                "CONNTRACK_COMMAND_OUTCOMES_TOPIC": outcomes,
            },
        )
        doc["logs"] = {"projector": str(projector.log_path), "api": str(api.log_path)}
        logs = {"projector": _LogWatch(projector.log_path), "api": _LogWatch(api.log_path)}
        lag = _Lag(cfg.kafka, url, topic, cfg.partitions)
        sent, go = ctx.Value("q", 0), ctx.Event()
        producer_ready, get_ready, calls = ctx.Event(), ctx.Event(), ctx.Queue()
        workers: list[multiprocessing.process.BaseProcess] = []
        try:
            await projector.start()
            await api.start()
            await wait_grpc_serving(target, api)
            await wait_assigned(url, topic, cfg.partitions, projector)
            ids = await _publish_resident(cfg.kafka, topic, params.resident, cfg.seed)
            await lag.start()
            while (await lag.sample())[2] > 0:  # the resident connections are all in
                projector.check_alive()
                await asyncio.sleep(0.2)
            producer_proc = ctx.Process(
                target=_run_in_process,
                args=(
                    _produce_at_rate,
                    cfg.kafka,
                    topic,
                    params.rate,
                    seconds,
                    cfg.seed,
                    producer_ready,
                    go,
                    sent,
                ),
                daemon=True,
            )
            get_proc = ctx.Process(
                target=_run_in_process,
                args=(
                    _get_loop,
                    target,
                    ids,
                    params.get_rate,
                    params.get_concurrency,
                    seconds,
                    get_ready,
                    go,
                    calls,
                ),
                daemon=True,
            )
            generator = load_generator(cfg)
            doc["params"]["get_load_generator"] = (
                generator.name
                if generator.ghz
                else ("python grpc.aio, one process, open loop (bench/soak.py)")
            )
            ghz = _GhzLoad(generator, target, ids, params) if generator.ghz else None
            workers = [producer_proc] if ghz else [producer_proc, get_proc]
            for w in workers:
                w.start()
            if ghz:
                get_ready.set()
            for what, event in (("producer", producer_ready), ("Get load", get_ready)):
                if not await asyncio.to_thread(event.wait, 120):
                    raise TimeoutError(f"the {what} process did not get ready")
            async with (
                Publisher(cfg.kafka, topic, "bench-soak-probe") as publisher,
                grpc.aio.insecure_channel(target) as channel,
            ):
                probes = _Probes(url, connection_service_pb2_grpc.ConnectionServiceStub(channel))
                await probes.start()
                try:
                    await _measure(
                        params,
                        doc,
                        out,
                        projector,
                        api,
                        logs,
                        lag,
                        sent,
                        go,
                        calls,
                        probes,
                        publisher,
                        {"producer": producer_proc.pid, "get_load": get_proc.pid},
                        ghz,
                    )
                finally:
                    await probes.stop()
        finally:
            await lag.stop()
            for w in workers:
                w.join(timeout=15)
                if w.is_alive():
                    w.kill()
            await api.stop()
            await projector.stop()
    # What the services logged while stopping belongs to the run: counted in the last interval.
    if doc["intervals"]:
        last = doc["intervals"][-1]["log"]
        for name, watch in logs.items():
            for kind, n in watch.scan().items():
                last[name][kind] += n
        doc["log_samples"] = {name: watch.samples for name, watch in logs.items()}
    doc["complete"] = True
    doc["verdict"] = verdict(doc["intervals"], params)
    doc["meta"]["finished_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    write_document(out, doc)
    return doc


async def _measure(
    params: SoakParams,
    doc: dict[str, Any],
    out: Path,
    projector: Service,
    api: Service,
    logs: dict[str, _LogWatch],
    lag: _Lag,
    sent: Any,
    go: Any,
    calls: Any,
    probes: _Probes,
    publisher: Publisher,
    load_pids: dict[str, int | None],
    ghz: _GhzLoad | None,
) -> None:
    published: dict[str, float] = {}  # probe id -> publish time (perf_counter, as _Probes)
    received: list[_Call] = []
    counted_probes: set[str] = set()
    interval = params.interval_s
    go.set()
    start = time.monotonic()
    probe_start = time.perf_counter()
    if ghz:
        ghz.start(start)

    async def probe() -> None:
        gap = 1 / params.probes_per_second
        while True:
            cid = f"probe-{uuid.uuid4().hex[:24]}"
            at = time.perf_counter()
            await publisher.connected(cid, "198.51.100.7", "conntrack-bench soak probe")
            probes.add(cid, at)
            published[cid] = at
            await asyncio.sleep(max(0.0, probe_start + len(published) * gap - time.perf_counter()))

    prober = asyncio.create_task(probe())
    watched = {
        "projector": projector.pid,
        "api": api.pid,
        **{name: pid for name, pid in load_pids.items() if pid is not None},
    }
    cpu = CpuWindow(watched)
    last_sent, last_end = 0, lag.samples[-1][1] if lag.samples else 0
    try:
        for k in range(params.intervals):
            begin, end = start + k * interval, start + (k + 1) * interval
            while (now := time.monotonic()) < end:
                projector.check_alive()
                api.check_alive()
                if prober.done():
                    prober.result()  # raise why probing stopped
                await asyncio.sleep(min(1.0, end - now))
            row: dict[str, Any] = {
                "index": k,
                "end_s": round(end - start, 1),
                "warmup": k < params.warmup_intervals,
                "projector_rss_mb": _tree_rss_mb(projector.pid),
                "api_rss_mb": _tree_rss_mb(api.pid),
            }
            use = cpu.finish()
            cpu = CpuWindow(watched)
            count = int(sent.value)
            _, log_end, _ = await lag.sample()
            row["events_sent_per_s"] = round((count - last_sent) / interval, 1)
            row["log_appended_per_s"] = round((log_end - last_end) / interval, 1)
            last_sent, last_end = count, log_end
            await asyncio.sleep(SETTLE_S)
            while True:
                try:
                    received.extend(calls.get_nowait())
                except Exception:  # queue.Empty
                    break
            lags = lag.between(begin, end) or [lag.samples[-1][2]]
            row.update(
                lag_max=max(lags),
                lag_mean=round(statistics.fmean(lags), 1),
                lag_end=lags[-1],
            )
            # Freshness: the probes that became visible (or timed out) in this interval.
            p_begin = probe_start + k * interval
            p_end = p_begin + interval
            fresh, missed = [], 0
            for cid, at in published.items():
                if cid in counted_probes:
                    continue
                seconds = probes.visible.get(cid)
                settled = at + seconds if seconds is not None else at + PROBE_TIMEOUT_S + SETTLE_S
                if settled >= p_end or (seconds is None and time.perf_counter() < settled):
                    continue
                counted_probes.add(cid)
                if seconds is None:
                    missed += 1
                else:
                    fresh.append(seconds)
            row.update(
                freshness_p50_ms=_ms(fresh, 50),
                freshness_p99_ms=_ms(fresh, 99),
                probes_visible=len(fresh),
                probes_missed=missed,
            )
            row["cpu_cores"] = use.as_dict()
            if ghz:
                load = await ghz.result(k)
                row.update(
                    get_ok_per_s=round(load.qps, 1),
                    get_p50_ms=round(load.p50_ms, 2) if load.ok else None,
                    get_p99_ms=round(load.p99_ms, 2) if load.ok else None,
                    get_statuses=load.statuses,
                )
                row["cpu_cores"]["get_load"] = round(load.client_cpu_cores, 3)
            else:
                window = [c for c in received if c[0] < end]
                received = [c for c in received if c[0] >= end]
                ok = [lat for _, lat, _ in window if lat is not None]
                row.update(
                    get_ok_per_s=round(len(ok) / interval, 1),
                    get_p50_ms=_ms(ok, 50),
                    get_p99_ms=_ms(ok, 99),
                    get_statuses=dict(Counter(status for _, _, status in window)),
                )
            row["log"] = {name: watch.scan() for name, watch in logs.items()}
            doc["intervals"].append(row)
            doc["log_samples"] = {name: watch.samples for name, watch in logs.items()}
            write_document(out, doc)
            print(_progress(row, params), file=sys.stderr, flush=True)
    finally:
        prober.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prober
        if ghz:
            await ghz.stop()


def _progress(row: dict[str, Any], params: SoakParams) -> str:
    def f(v: float | None, unit: str = "") -> str:
        return "-" if v is None else f"{v:,.0f}{unit}"

    logs = row["log"]
    return (
        f"soak: {row['end_s']:>6.0f}s{' (warm-up)' if row['warmup'] else ''}  "
        f"events {f(row['events_sent_per_s'])}/s of {params.rate:,}  "
        f"RSS projector {f(row['projector_rss_mb'])} MB api {f(row['api_rss_mb'])} MB  "
        f"lag max {f(row['lag_max'])}  freshness p99 {f(row['freshness_p99_ms'], ' ms')}  "
        f"Get {f(row['get_ok_per_s'])}/s p99 {row['get_p99_ms'] or '-'} ms  "
        f"log errors {logs['projector']['errors'] + logs['api']['errors']} "
        f"warnings {logs['projector']['warnings'] + logs['api']['warnings']}"
    )


def plot(doc: dict[str, Any], png: Path) -> None:
    """The series of doc["intervals"] as six panels; needs matplotlib (the dev extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["intervals"]
    params = doc["params"]
    x = [r["end_s"] / 60 for r in rows]
    warm = [r["end_s"] / 60 for r in rows if r["warmup"]]
    fig, axes = plt.subplots(3, 2, figsize=(13, 11), sharex=True)
    panels: list[tuple[str, str, list[tuple[str, str]]]] = [
        ("RSS", "MB", [("projector_rss_mb", "projector"), ("api_rss_mb", "API")]),
        ("Projector lag (records behind the log end)", "records",
         [("lag_max", "max"), ("lag_mean", "mean"), ("lag_end", "at interval end")]),
        ("Freshness (publish to visible in Get)", "ms",
         [("freshness_p99_ms", "p99"), ("freshness_p50_ms", "p50")]),
        ("Get latency", "ms", [("get_p99_ms", "p99"), ("get_p50_ms", "p50")]),
        ("Event rate", "events/s",
         [("events_sent_per_s", "sent by the producer"), ("log_appended_per_s", "appended")]),
    ]  # fmt: skip
    for ax, (title, unit, series) in zip(axes.flat, panels, strict=False):
        for key, label in series:
            ax.plot(x, [r[key] for r in rows], marker=".", label=label)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
    axes.flat[4].axhline(params["rate"], color="grey", linestyle="--", label="asked for")
    ax = axes.flat[5]
    for service in ("projector", "api"):
        ax.plot(
            x, [r["log"][service]["errors"] for r in rows], marker="x", label=f"{service} errors"
        )
        ax.plot(
            x,
            [r["log"][service]["warnings"] for r in rows],
            marker=".",
            label=f"{service} warnings",
        )
    ax.set_title("Log lines per interval")
    ax.set_ylabel("lines")
    ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))  # a run without any still shows 0 as the floor
    for ax in axes.flat:
        if warm:
            ax.axvspan(0, max(warm), color="grey", alpha=0.15, label="warm-up")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("minutes since the load started")
    v = doc.get("verdict") or {}
    met = {True: "met", False: "NOT met", None: "n/a"}[v.get("met")]
    fig.suptitle(
        f"conntrack soak: {params['rate']:,} events/s, Get {params['get_rate']:,}/s, "
        f"{len(rows)} x {params['interval_s']:g} s, {doc['meta'].get('started_at', '')}; "
        f"verdict {met}"
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser, positive_int: Any, positive_float: Any) -> None:
    p.add_argument(
        "--minutes", type=positive_float, default=60.0, help="length of the run (default 60)"
    )
    p.add_argument(
        "--rate", type=positive_int, default=5_000, help="events/s published (default 5000)"
    )
    p.add_argument("--get-rate", type=positive_int, default=500, help="Get calls/s (default 500)")
    p.add_argument(
        "--get-concurrency",
        type=positive_int,
        default=32,
        help="most Get calls in flight (default 32)",
    )
    p.add_argument(
        "--interval",
        type=parse_duration,
        default=60.0,
        help="one row of figures per interval, e.g. 20s, 1m (default 1m)",
    )
    p.add_argument(
        "--warmup",
        type=parse_duration,
        help="left out of the verdict (default 5m, or a fifth of the run if shorter)",
    )
    p.add_argument(
        "--compare",
        type=positive_int,
        help="intervals at each end compared for RSS growth and lag trend (default 5, fewer on "
        "a short run)",
    )
    p.add_argument(
        "--resident",
        type=positive_int,
        default=10_000,
        help="open connections the Get load reads (default 10000)",
    )
    p.add_argument(
        "--probes-per-second",
        type=positive_float,
        default=5.0,
        help="freshness probes published per second (default 5)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="the JSON; the PNG goes beside it (default bench-results/soak-<UTC time>.json)",
    )
    p.add_argument(
        "--kafka", help="bootstrap servers (default 127.0.0.1:19092; env CONNTRACK_BENCH_KAFKA)"
    )
    p.add_argument("--postgres-url", help="as for run")
    p.add_argument(
        "--partitions", type=positive_int, help="partitions of the events topic (default 6)"
    )
    p.add_argument("--seed", type=int, help="workload seed (default 1)")
    p.add_argument(
        "--load-generator",
        choices=("auto", "ghz", "python"),
        help="Get load generator (default auto: ghz if found, one run per interval; else a "
        "Python client process)",
    )
    p.add_argument("--ghz", help="path of the ghz binary (default: PATH, then $GOPATH/bin)")
    p.add_argument(
        "--work-dir", type=Path, help="where service logs go (default bench-results/work)"
    )


def params_from(ns: argparse.Namespace) -> SoakParams:
    params = SoakParams(
        minutes=ns.minutes,
        rate=ns.rate,
        get_rate=ns.get_rate,
        get_concurrency=ns.get_concurrency,
        interval_s=ns.interval,
        warmup_s=ns.warmup,
        compare=ns.compare,
        resident=ns.resident,
        probes_per_second=ns.probes_per_second,
    )
    if params.interval_s < 2:
        raise ValueError("--interval must be at least 2s")
    if params.intervals < 2:
        raise ValueError("the run must hold at least two intervals (--minutes vs --interval)")
    return params


def default_out() -> Path:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path("bench-results") / f"soak-{stamp}.json"


def main(cfg: BenchConfig, params: SoakParams, meta: dict[str, Any], out: Path) -> int:
    png = out.with_suffix(".png")
    try:
        import matplotlib  # noqa: F401  (checked before the hour, not after it)
    except ImportError:
        print(
            "bench soak: matplotlib is missing (it is in the dev extra: pip install -e '.[dev]')",
            file=sys.stderr,
        )
        return 2
    print(
        f"bench soak: {params.intervals} x {params.interval_s:g} s at {params.rate:,} events/s, "
        f"Get {params.get_rate:,}/s; JSON {out}, PNG {png}",
        file=sys.stderr,
        flush=True,
    )
    try:
        doc = asyncio.run(run(cfg, params, meta, out))
    except (Exception, KeyboardInterrupt) as exc:
        # Ctrl-C included: the topics and the database are gone by now (the context managers
        # ran), and what was measured is in the JSON.
        interrupted = isinstance(exc, KeyboardInterrupt)
        why = "interrupted" if interrupted else f"{type(exc).__name__}: {exc}"
        print(f"bench soak: stopped: {why}", file=sys.stderr)
        if out.exists():
            print(f"bench soak: the intervals measured so far are in {out}", file=sys.stderr)
        return 130 if interrupted else 1
    plot(doc, png)
    print("\n".join(verdict_lines(doc["verdict"], params)))
    print(f"\nJSON written to {out}\nPNG written to {png}")
    return 0
