"""Figure 4: how long after publishing a Connected event a Get finds the connection, while the
topic carries a fixed background rate (activity-heavy traffic) through `conntrack-projector`
into the read model that `conntrack-api serve` answers from.

Probes are Connected events of fresh connections, published through producer.publisher
.Publisher (the gateway path) at a low rate; a probe is visible when Get answers OK for it
(see _Probes for how they are polled). The ceiling is the same publish-to-seen time for a
plain consumer tailing the topic in this process (Kafka's own latency, no decoding, no
database)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
import uuid
from typing import Any

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
from bench.procstat import CpuWindow
from bench.results import Figure, ScenarioResult, TargetCheck, add_latency_figures
from bench.services import (
    Service,
    api_service,
    free_port,
    projector_service,
    running,
    wait_grpc_serving,
)
from bench.workloads import activity_heavy
from conntrack.core.events import HEADERS
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2,
    connection_service_pb2_grpc,
)
from conntrack.producer.publisher import Publisher

TARGET_RATE = 10_000
TARGET_P99_MS = 250.0
POLL_INTERVAL_S = 0.01
PROBE_TIMEOUT_S = 10.0


async def wait_assigned(database_url: str, topic: str, partitions: int, projector: Service) -> None:
    """Until the projector has read (and so created) its stored position of every partition."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        deadline = time.monotonic() + 60
        while True:
            projector.check_alive()
            n = await conn.fetchval(
                "SELECT count(*) FROM projection_offsets WHERE topic = $1", topic
            )
            if n == partitions:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"projector not assigned after 60s:\n{projector.log_tail()}")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def stored_positions(database_url: str, topic: str) -> dict[int, int]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = await conn.fetch(
            "SELECT partition, next_offset FROM projection_offsets WHERE topic = $1", topic
        )
        return {int(r["partition"]): int(r["next_offset"]) for r in rows}
    finally:
        await conn.close()


# Background traffic, in a process of its own so its Python work does not slow the probes.


def _background(
    bootstrap: str, topic: str, rate: int, seconds: float, seed: int, ready: Any, go: Any, out: Any
) -> None:
    out.put(asyncio.run(_publish_at_rate(bootstrap, topic, rate, seconds, seed, ready, go)))


async def _publish_at_rate(
    bootstrap: str, topic: str, rate: int, seconds: float, seed: int, ready: Any, go: Any
) -> tuple[int, float]:
    records = activity_heavy(int(rate * seconds) + 10, seed).records(time.time_ns())
    # Like the Publisher: idempotent, acks from all in-sync replicas, 5 ms linger.
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    headers = list(HEADERS)
    try:
        ready.set()
        await asyncio.to_thread(go.wait, 60)
        started = time.perf_counter()
        sent = 0
        while True:
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
            due = min(len(records), int(rate * elapsed))
            while sent < due:
                key, value = records[sent]
                await producer.send(topic, value=value, key=key, headers=headers)
                sent += 1
            await asyncio.sleep(0.005)
        sending = time.perf_counter() - started
        await producer.flush()
        return sent, sending
    finally:
        await producer.stop()


class _Tail:
    """A plain consumer at the end of the topic, noting when each probe key arrives."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.watch: set[bytes] = set()
        self.seen: dict[bytes, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign(self._tps)
        await self._consumer.seek_to_end(*self._tps)
        for tp in self._tps:  # resolve the end positions now, before any probe is published
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=50)
            now = time.perf_counter()
            for records in batch.values():
                for r in records:
                    if r.key in self.watch and r.key not in self.seen:
                        self.seen[r.key] = now

    def highwater(self) -> int | None:
        """Events in the topic as of the last fetch (None until every partition was fetched)."""
        marks = [self._consumer.highwater(tp) for tp in self._tps]
        return None if None in marks else sum(marks)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()


class _Backlog:
    """Events in the topic not yet in the projector's stored positions, sampled every 0.5 s: a
    backlog that keeps growing means the projector cannot keep up with the rate, and then the
    latencies grow with the length of the run rather than describing the system."""

    def __init__(self, database_url: str, topic: str, tail: _Tail) -> None:
        self._url, self._topic, self._tail = database_url, topic, tail
        self.samples: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._conn = await asyncpg.connect(asyncpg_dsn(self._url))
        self._task = asyncio.create_task(self._run())

    async def sample(self) -> int | None:
        stored = await self._conn.fetchval(
            "SELECT coalesce(sum(next_offset), 0) FROM projection_offsets WHERE topic = $1",
            self._topic,
        )
        written = self._tail.highwater()
        if written is None:
            return None
        backlog = max(0, written - int(stored))
        self.samples.append(backlog)
        return backlog

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self.sample()

    async def stop(self) -> int | None:
        """Stop sampling; returns one last sample, taken now."""
        if self._task is None:
            return None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        try:
            return await self.sample()
        finally:
            await self._conn.close()


class _Probes:
    """Probe connections waiting to become visible. One query every POLL_INTERVAL_S finds the
    ones whose row has appeared in the read model; each is then confirmed with a Get, whose
    answer time is the visible time. (Polling every probe with Get would put a load on the
    API that grows with the very latency being measured.)"""

    def __init__(self, database_url: str, stub: connection_service_pb2_grpc.ConnectionServiceStub):
        self._url = database_url
        self._stub = stub
        self.pending: dict[str, float] = {}  # connection id -> publish time
        self.visible: dict[str, float | None] = {}  # seconds from publish; None: never
        self._confirming: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._expected: int | None = None
        self._all_settled = asyncio.Event()

    async def start(self) -> None:
        self._conn = await asyncpg.connect(asyncpg_dsn(self._url))
        self._task = asyncio.create_task(self._watch())

    def add(self, cid: str, published: float) -> None:
        self.pending[cid] = published

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            now = time.perf_counter()
            for cid, published in list(self.pending.items()):
                if now - published > PROBE_TIMEOUT_S:
                    del self.pending[cid]
                    self._settle(cid, None)
            if not self.pending:
                continue
            rows = await self._conn.fetch(
                "SELECT connection_id FROM connections WHERE connection_id = ANY($1::text[])",
                list(self.pending),
            )
            for row in rows:
                cid = row["connection_id"]
                published = self.pending.pop(cid)
                task = asyncio.create_task(self._confirm(cid, published))
                self._confirming.add(task)
                task.add_done_callback(self._confirming.discard)

    async def _confirm(self, cid: str, published: float) -> None:
        request = connection_service_pb2.GetConnectionRequest(connection_id=cid)
        while time.perf_counter() - published < PROBE_TIMEOUT_S:
            try:
                await self._stub.Get(request, timeout=2.0)
                self._settle(cid, time.perf_counter() - published)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            await asyncio.sleep(POLL_INTERVAL_S)
        self._settle(cid, None)

    def _settle(self, cid: str, seconds: float | None) -> None:
        self.visible[cid] = seconds
        if self._expected is not None and len(self.visible) >= self._expected:
            self._all_settled.set()

    async def finish(self, count: int) -> None:
        """Until all `count` probes are settled (visible or timed out), then stop watching."""
        self._expected = count
        if len(self.visible) >= count:
            self._all_settled.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_settled.wait(), PROBE_TIMEOUT_S + 5)
        if self._task is not None and self._task.done():
            self._task.result()  # the watcher failed: raise why, not "nothing became visible"
        await self.stop()

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._confirming) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._task is not None:
            self._task = None
            await self._conn.close()


async def run(cfg: BenchConfig, result: ScenarioResult) -> None:
    rate, seconds = cfg.freshness_rate, cfg.freshness_seconds
    result.params.update(
        rate=rate,
        seconds=seconds,
        probes_per_second=cfg.freshness_probes_per_second,
        poll_interval_ms=POLL_INTERVAL_S * 1000,
        partitions=cfg.partitions,
    )
    log_dir = cfg.work_dir / "logs"
    ctx = multiprocessing.get_context("spawn")
    async with fresh_topics(cfg, "freshness") as (topic, dlq), fresh_database(cfg, "fresh") as url:
        settings = projector_settings(cfg, topic, dlq, url)
        target = f"127.0.0.1:{free_port()}"
        projector = projector_service(settings_environment(settings), log_dir)
        api = api_service(url, target, log_dir)
        async with running(projector), running(api):
            await wait_grpc_serving(target, api)
            await wait_assigned(url, topic, cfg.partitions, projector)
            ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
            background = ctx.Process(
                target=_background,
                args=(cfg.kafka, topic, rate, seconds, cfg.seed, ready, go, out),
                daemon=True,
            )
            background.start()
            tail = _Tail(cfg.kafka, topic, cfg.partitions)
            try:
                if not await asyncio.to_thread(ready.wait, 120):
                    raise TimeoutError("the background publisher did not get ready")
                await tail.start()
                async with (
                    Publisher(cfg.kafka, topic, "bench-probe") as publisher,
                    grpc.aio.insecure_channel(target) as channel,
                ):
                    probes = _Probes(
                        url, connection_service_pb2_grpc.ConnectionServiceStub(channel)
                    )
                    await probes.start()
                    backlog = _Backlog(url, topic, tail)
                    await backlog.start()
                    try:
                        cpu = CpuWindow({"projector": projector.pid, "api": api.pid})
                        go.set()
                        started = time.perf_counter()
                        published_at: dict[str, float] = {}
                        interval = 1 / cfg.freshness_probes_per_second
                        while time.perf_counter() - started < seconds:
                            cid = f"probe-{uuid.uuid4().hex[:24]}"
                            tail.watch.add(cid.encode())
                            published = time.perf_counter()
                            await publisher.connected(cid, "198.51.100.7", "conntrack-bench probe")
                            probes.add(cid, published)
                            published_at[cid] = published
                            next_at = started + len(published_at) * interval
                            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                        sent, elapsed = await asyncio.to_thread(out.get, True, 120)
                        use = cpu.finish()
                        backlog_at_stop = await backlog.stop()
                        await probes.finish(len(published_at))
                    finally:
                        await backlog.stop()
                        await probes.stop()
            finally:
                await tail.stop()
                background.join(timeout=10)
                if background.is_alive():
                    background.kill()
            result.params.update(
                projector_peak_rss_mb=projector.peak_rss_mb(), api_peak_rss_mb=api.peak_rss_mb()
            )
    achieved = sent / elapsed if elapsed > 0 else 0.0
    visible = [probes.visible.get(cid) for cid in published_at]
    latencies = sorted(v * 1000 for v in visible if v is not None)
    missed = sum(v is None for v in visible)
    kafka = sorted(
        (tail.seen[cid.encode()] - published) * 1000
        for cid, published in published_at.items()
        if cid.encode() in tail.seen
    )
    result.params.update(
        achieved_rate=round(achieved),
        background_events=sent,
        probes=len(published_at),
        probes_missed=missed,
        backlog_at_traffic_stop=backlog_at_stop,
        backlog_max=max(backlog.samples, default=None),
        backlog_samples=backlog.samples,
    )
    result.cpu["traffic"] = use.as_dict()
    if not latencies:
        raise RuntimeError(f"no probe became visible within {PROBE_TIMEOUT_S:.0f}s")
    kafka_label = "plain consumer tailing the topic"
    result.add(
        Figure("rate", "background event rate achieved", achieved, "events/s", rate, "asked for")
    )
    p99 = add_latency_figures(
        result, "", "publish-to-visible-in-Get", latencies, kafka, kafka_label
    )
    if missed:
        result.notes.append(f"{missed} of {len(published_at)} probes never became visible")
    # A steady backlog of a fraction of a second is the pipeline's depth; a second or more of
    # traffic means the projector falls behind, and the latencies then grow with the run.
    if backlog_at_stop is not None and backlog_at_stop >= rate:
        result.notes.append(
            f"the projector was {backlog_at_stop:,} events ({backlog_at_stop / rate:.1f}s of "
            "traffic) behind when the traffic stopped: it may not keep up with this rate, and "
            "its latencies then grow with the run (see params.backlog_samples)"
        )
    check = TargetCheck(
        "p99 <= 250 ms at 10k events/s",
        f"{p99.value:.0f} ms at {achieved:,.0f} events/s",
        p99.value <= TARGET_P99_MS and missed == 0,
    )
    if achieved < 0.9 * TARGET_RATE:
        check.met = None
        check.note = "rate below 10k events/s"
    result.targets.append(check)
