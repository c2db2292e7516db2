"""Figure 6: Send latency through the whole command path, and what one API process sustains.

A real gateway node (`conntrack-gateway`, subprocess) holds N WebSocket clients (in a process of
their own); `conntrack-projector` puts their connections into the read model and
`conntrack-api serve` answers Send from it: API -> commands topic -> the node -> the socket,
and the node's outcome -> outcomes topic -> API -> OK. The load generator (this process) calls
Send at a steady rate, open loop, each to a random client, with its start time in the payload:

- delivery latency: from the gRPC call's start to the frame arriving at the client;
- call latency: from the call's start to its OK (the outcome's way back included).

Beside them, in the same run: a plain aiokafka producer (acks=all, idempotent, as the API's
command producer) and a consumer tailing its topic at the same rate, produce-to-consume p50/p99
(one Kafka hop; a Send's delivery takes one, its call two); and the most sends/s one API process
sustains, closed loop at a few concurrencies below CONNTRACK_API_MAX_CONCURRENT_CALLS."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.config import BenchConfig
from bench.infra import (
    asyncpg_dsn,
    fresh_database,
    fresh_topics,
    projector_settings,
    settings_environment,
    unique,
)
from bench.procstat import CpuWindow
from bench.results import Figure, ScenarioResult, TargetCheck, add_latency_figures, percentile
from bench.scenarios.freshness import wait_assigned
from bench.services import (
    Service,
    command,
    free_port,
    projector_service,
    running,
    service_environment,
    wait_grpc_serving,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2,
    connection_service_pb2_grpc,
)
from conntrack.producer.topics import TopicSpec, ensure_topics

TARGET_RATE = 1_000
TARGET_P99_MS = 50.0
CALL_TIMEOUT_S = 10.0
# Closed-loop concurrencies for the most sends/s: below the API's default limit of calls in
# flight (CONNTRACK_API_MAX_CONCURRENT_CALLS, 256; 64 when these were chosen), beyond which
# calls are shed.
MAX_CONCURRENCIES = (8, 24, 56)
Request = connection_service_pb2.SendToConnectionRequest


# -- the WebSocket clients, in a process of their own ---------------------------------------


def _clients(
    url: str, n: int, ids: Any, stop: Any, out: Any, headers: dict[str, str] | None = None
) -> None:
    out.put(asyncio.run(_hold_clients(url, n, ids, stop, headers)))


@contextlib.contextmanager
def _collector_off() -> Iterator[None]:
    """The cyclic garbage collector off (after a collection) for a measuring window of the
    bench's own processes, whose pauses would count as latency of the system measured."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _hold_clients(
    url: str, n: int, ids: Any, stop: Any, headers: dict[str, str] | None = None
) -> dict[int, int]:
    """Connect n clients (with these handshake headers), report their connection ids, note each
    message's arrival (its payload is `SEQ START_NS`) until stop is set; returns
    {seq: arrival time_ns}."""
    from websockets.asyncio.client import ClientConnection, connect

    arrived: dict[int, int] = {}

    async def read(ws: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            async for message in ws:
                now = time.time_ns()
                seq, _, _ = str(message).partition(" ")
                if seq.isdigit():
                    arrived[int(seq)] = now

    sockets: list[ClientConnection] = []
    for i in range(0, n, 50):  # in slices, so the gateway's accept queue is not flooded
        sockets += await asyncio.gather(
            *(
                connect(url, user_agent_header="conntrack-bench", additional_headers=headers)
                for _ in range(min(50, n - i))
            )
        )
    ids.put([ws.response.headers["X-Connection-Id"] for ws in sockets if ws.response])
    readers = [asyncio.create_task(read(ws)) for ws in sockets]
    # The clock's own pauses are not the system's: a full collection over the 1,000 clients'
    # objects held this process's arrival stamps back by up to 150 ms. Nothing here makes
    # garbage that needs the cyclic collector within a run.
    with _collector_off():
        await asyncio.to_thread(stop.wait)
    await asyncio.sleep(0.5)  # frames still on their way
    for ws in sockets:
        await ws.close()
    for task in readers:
        task.cancel()
    return arrived


# -- the services ----------------------------------------------------------------------------


async def _wait_log(service: Service, text: str, within_s: float = 60.0) -> str:
    deadline = time.monotonic() + within_s
    while True:
        service.check_alive()
        for line in service.log_path.read_text(errors="replace").splitlines():
            if line.startswith(text):
                return line
        if time.monotonic() > deadline:
            raise TimeoutError(f"{service.name}: no {text!r} in {within_s:.0f}s")
        await asyncio.sleep(0.1)


async def _wait_rows(database_url: str, n: int, within_s: float = 60.0) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        deadline = time.monotonic() + within_s
        while await conn.fetchval("SELECT count(*) FROM connections") < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {n} clients' connections not projected in {within_s}s")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


# -- the load --------------------------------------------------------------------------------


class _Sends:
    """Every Send made: its start (time_ns), the call's latency (ms) or its error code."""

    def __init__(self, stub: connection_service_pb2_grpc.ConnectionServiceStub, ids: list[str]):
        self._stub, self._ids = stub, ids
        self._random = random.Random(1)
        self.started: dict[int, int] = {}
        self.call_ms: dict[int, float] = {}
        self.errors: dict[str, int] = {}
        self._seq = 0

    async def one(self) -> None:
        seq = self._seq
        self._seq += 1
        cid = self._random.choice(self._ids)
        start = time.time_ns()
        self.started[seq] = start
        request = Request(connection_id=cid, data=f"{seq} {start}".encode(), type=Request.TEXT)
        try:
            await self._stub.Send(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            self.errors[exc.code().name] = self.errors.get(exc.code().name, 0) + 1
            return
        self.call_ms[seq] = (time.time_ns() - start) / 1e6

    async def at_rate(self, rate: int, seconds: float) -> tuple[int, float]:
        """Open loop: the i-th Send starts at i/rate s, whatever the earlier ones are doing."""
        tasks: set[asyncio.Task[None]] = set()
        began = time.perf_counter()
        sent = 0
        while (elapsed := time.perf_counter() - began) < seconds:
            due = int(rate * elapsed)
            while sent < due:
                task = asyncio.create_task(self.one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.001)
        sending = time.perf_counter() - began
        if tasks:
            await asyncio.wait(tasks, timeout=CALL_TIMEOUT_S + 5)
        return sent, sending

    async def closed_loop(self, concurrency: int, seconds: float) -> tuple[float, list[float]]:
        """`concurrency` callers, each starting its next Send when the last one answers."""
        first = self._seq
        deadline = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < deadline:
                await self.one()

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        calls = sorted(v for k, v in self.call_ms.items() if k >= first)
        return len(calls) / elapsed, calls


async def _kafka_baseline(bootstrap: str, rate: int, seconds: float) -> tuple[list[float], int]:
    """Produce-to-consume latencies (ms) of a plain producer and a consumer tailing the topic,
    at `rate` records/s; and how many records were produced."""
    topic = unique("send-kafka")
    await ensure_topics(bootstrap, [TopicSpec(topic, 1, 1, 1, retention_ms=3_600_000)])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    latencies: list[float] = []
    await producer.start()
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)

        all_in = asyncio.Event()
        expected: int | None = None

        async def tail() -> None:
            while True:
                batch = await consumer.getmany(tp, timeout_ms=100)
                now = time.time_ns()
                for record in batch.get(tp, []):
                    latencies.append((now - int(record.value)) / 1e6)
                if expected is not None and len(latencies) >= expected:
                    all_in.set()

        tailing = asyncio.create_task(tail())
        began = time.perf_counter()
        sent = 0
        pending: list[asyncio.Future[Any]] = []
        while (elapsed := time.perf_counter() - began) < seconds:
            while sent < int(rate * elapsed):
                pending.append(await producer.send(topic, str(time.time_ns()).encode()))
                sent += 1
            await asyncio.sleep(0.001)
        await asyncio.gather(*pending)
        expected = sent
        if len(latencies) >= expected:
            all_in.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), 10)
        tailing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tailing
    finally:
        await consumer.stop()
        await producer.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()
    return sorted(latencies), sent


# -- the scenario ----------------------------------------------------------------------------


def _gateway(
    cfg: BenchConfig,
    events: str,
    commands: str,
    outcomes: str,
    log_dir: Path,
    extra: dict[str, str] | None = None,
    argv: list[str] | None = None,
) -> Service:
    env = service_environment(
        {
            "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS": cfg.kafka,
            "CONNTRACK_EVENTS_TOPIC": events,
            "CONNTRACK_COMMANDS_TOPIC": commands,
            "CONNTRACK_COMMAND_OUTCOMES_TOPIC": outcomes,
            "CONNTRACK_GATEWAY_LISTEN": f"127.0.0.1:{free_port()}",
            "CONNTRACK_GATEWAY_NODE_ID": unique("node"),
            "CONNTRACK_LOG_LEVEL": "WARNING",
            "CONNTRACK_METRICS_PORT": "0",
            **(extra or {}),
        }
    )
    return Service(
        "conntrack-gateway",
        argv or command("conntrack-gateway", "conntrack.gateway"),
        env,
        log_dir,
    )


def _api(
    cfg: BenchConfig, url: str, listen: str, commands: str, outcomes: str, log_dir: Path
) -> Service:
    env = service_environment(
        {
            "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS": cfg.kafka,
            "CONNTRACK_DATABASE_URL": url,
            "CONNTRACK_API_LISTEN": listen,
            "CONNTRACK_COMMANDS_TOPIC": commands,
            "CONNTRACK_COMMAND_OUTCOMES_TOPIC": outcomes,
            "CONNTRACK_LOG_LEVEL": "WARNING",
            "CONNTRACK_METRICS_PORT": "0",
            # "The most sends/s of one API": one process, as figure 6 was measured.
            "CONNTRACK_API_WORKERS": "1",
        }
    )
    for name in (
        "CONNTRACK_API_TLS_CERT_FILE",
        "CONNTRACK_API_TLS_KEY_FILE",
        "CONNTRACK_API_TLS_CLIENT_CA_FILE",
        "CONNTRACK_API_TOKENS",
        "CONNTRACK_API_TOKENS_FILE",
    ):
        env.pop(name, None)
    return Service(
        "conntrack-api", [*command("conntrack-api", "conntrack.api"), "serve"], env, log_dir
    )


async def _warm_up(sends: _Sends, ids: list[str], within_s: float = 60.0) -> None:
    """Until a Send answers OK (the API's command channel connects in the background)."""
    deadline = time.monotonic() + within_s
    stub = sends._stub
    while True:
        request = Request(connection_id=ids[0], data=b"warm-up", type=Request.TEXT)
        try:
            await stub.Send(request, timeout=5)
            return
        except grpc.aio.AioRpcError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Send never answered OK: {exc.code().name}") from None
        await asyncio.sleep(0.2)


async def run(cfg: BenchConfig, result: ScenarioResult) -> None:
    await _run(cfg, result, gateway=None, concurrencies=MAX_CONCURRENCIES)


# The Go gateway node (examples/go-gateway), built by scripts/test.sh or its README's command.
GO_GATEWAY = Path(__file__).resolve().parents[2] / ".local" / "go" / "bin" / "conntrack-go-gateway"


async def run_go(cfg: BenchConfig, result: ScenarioResult) -> None:
    """Figure 6's steady Sends through the Go gateway node instead of conntrack-gateway."""
    if not GO_GATEWAY.exists():
        raise RuntimeError(
            f"{GO_GATEWAY} is not built: cd examples/go-gateway && go build -o {GO_GATEWAY} ."
        )
    await _run(cfg, result, gateway=[str(GO_GATEWAY)], concurrencies=())


async def _run(
    cfg: BenchConfig,
    result: ScenarioResult,
    gateway: list[str] | None,
    concurrencies: tuple[int, ...],
) -> None:
    rate, seconds, n = cfg.send_rate, cfg.send_seconds, cfg.send_clients
    result.params.update(
        gateway=gateway[0] if gateway else "conntrack-gateway",
        rate=rate,
        seconds=seconds,
        clients=n,
        max_concurrencies=list(concurrencies),
        max_seconds_each=cfg.send_max_seconds,
        payload="'SEQ START_NS' as a TEXT frame (~25 bytes)",
    )
    log_dir = cfg.work_dir / "logs"
    ctx = multiprocessing.get_context("spawn")
    commands, outcomes = unique("commands"), unique("outcomes")
    await ensure_topics(
        cfg.kafka,
        [
            TopicSpec(commands, cfg.partitions, 1, 1, retention_ms=3_600_000),
            TopicSpec(outcomes, cfg.partitions, 1, 1, retention_ms=3_600_000),
        ],
    )
    try:
        async with fresh_topics(cfg, "send") as (topic, dlq), fresh_database(cfg, "send") as url:
            settings = projector_settings(cfg, topic, dlq, url)
            target = f"127.0.0.1:{free_port()}"
            projector = projector_service(settings_environment(settings), log_dir)
            node = _gateway(cfg, topic, commands, outcomes, log_dir, argv=gateway)
            api = _api(cfg, url, target, commands, outcomes, log_dir)
            async with running(projector), running(node), running(api):
                line = await _wait_log(node, "listening on ws://")
                ws_url = line.split()[2]
                await wait_grpc_serving(target, api)
                await wait_assigned(url, topic, cfg.partitions, projector)
                ids_q, stop, out = ctx.Queue(), ctx.Event(), ctx.Queue()
                holder = ctx.Process(target=_clients, args=(ws_url, n, ids_q, stop, out))
                holder.start()
                try:
                    ids: list[str] = await asyncio.to_thread(ids_q.get, True, 120)
                    await _wait_rows(url, n)
                    async with grpc.aio.insecure_channel(target) as channel:
                        stub = connection_service_pb2_grpc.ConnectionServiceStub(channel)
                        sends = _Sends(stub, ids)
                        await _warm_up(sends, ids)
                        cpu = CpuWindow({"api": api.pid, "gateway": node.pid})
                        with _collector_off():
                            sent, elapsed = await sends.at_rate(rate, seconds)
                        use = cpu.finish()
                        steady = dict(sends.started)
                        steady_calls = dict(sends.call_ms)
                        steady_errors = dict(sends.errors)
                        levels: list[dict[str, Any]] = []
                        for concurrency in concurrencies:
                            sends.errors.clear()
                            achieved, calls = await sends.closed_loop(
                                concurrency, cfg.send_max_seconds
                            )
                            levels.append(
                                {
                                    "concurrency": concurrency,
                                    "sends_per_s": round(achieved, 1),
                                    "call_p50_ms": round(percentile(calls, 50), 2),
                                    "call_p99_ms": round(percentile(calls, 99), 2),
                                    "errors": dict(sends.errors),
                                }
                            )
                    stop.set()
                    arrived: dict[int, int] = await asyncio.to_thread(out.get, True, 60)
                finally:
                    stop.set()
                    holder.join(timeout=10)
                    if holder.is_alive():
                        holder.kill()
                result.params.update(
                    api_peak_rss_mb=api.peak_rss_mb(), gateway_peak_rss_mb=node.peak_rss_mb()
                )
    finally:
        admin = AIOKafkaAdminClient(bootstrap_servers=cfg.kafka)
        await admin.start()
        try:
            await admin.delete_topics([commands, outcomes])
        except Exception as exc:  # cleanup must not hide the scenario's own outcome
            result.notes.append(f"could not delete {commands}, {outcomes}: {exc!r}")
        finally:
            await admin.close()

    kafka, kafka_sent = await _kafka_baseline(cfg.kafka, rate, seconds)

    achieved = sent / elapsed if elapsed > 0 else 0.0
    delivery = sorted((arrived[s] - start) / 1e6 for s, start in steady.items() if s in arrived)
    calls = sorted(steady_calls.values())
    lost = sum(1 for s in steady if s not in arrived)
    best = max(levels, key=lambda level: level["sends_per_s"], default=None)
    # Where in the run the slow ones were: a tail spread evenly is queueing, one in bursts is a
    # stall of some process.
    began_ns = min(steady.values(), default=0)
    by_second: dict[int, list[float]] = {}
    for s, start in steady.items():
        if s in arrived:
            by_second.setdefault((start - began_ns) // 1_000_000_000, []).append(
                (arrived[s] - start) / 1e6
            )
    result.params.update(
        delivery_p99_ms_by_second=[
            round(percentile(sorted(v), 99), 1) for _, v in sorted(by_second.items())
        ],
        sends=sent,
        delivered=len(delivery),
        not_delivered=lost,
        errors=steady_errors,
        max_levels=levels,
        kafka_records=kafka_sent,
        kafka_consumed=len(kafka),
    )
    result.cpu["steady_sends"] = use.as_dict()
    if not delivery:
        raise RuntimeError(f"no Send arrived at a client (errors: {steady_errors})")
    kafka_label = "plain Kafka produce-to-consume"
    result.add(Figure("rate", "Send rate achieved", achieved, "sends/s", rate, "asked for"))
    p99 = add_latency_figures(
        result, "delivery_", "Send call start to frame at client", delivery, kafka, kafka_label
    )
    result.add(Figure("call_p50_ms", "Send gRPC call p50", percentile(calls, 50), "ms"))
    call_p99 = result.add(Figure("call_p99_ms", "Send gRPC call p99", percentile(calls, 99), "ms"))
    if best is not None:
        result.add(
            Figure(
                "max_sends_per_s",
                "most sends/s of one API (closed loop)",
                best["sends_per_s"],
                "sends/s",
                note=f"at concurrency {best['concurrency']}, call p99 {best['call_p99_ms']} ms",
            )
        )
        result.add(
            Figure("max_call_p99_ms", "Send gRPC call p99 at that rate", best["call_p99_ms"], "ms")
        )
    if lost or steady_errors:
        result.notes.append(
            f"{lost} of {sent} Sends never reached their client; call errors: {steady_errors}"
        )
    for label, figure in (("frame at client", p99), ("gRPC call (OK back)", call_p99)):
        check = TargetCheck(
            f"Send {label} p99 <= 50 ms at 1,000 sends/s",
            f"{figure.value:.1f} ms at {achieved:,.0f} sends/s",
            figure.value <= TARGET_P99_MS and lost == 0 and not steady_errors,
        )
        if achieved < 0.9 * TARGET_RATE:
            check.met = None
            check.note = "rate below 1,000 sends/s"
        result.targets.append(check)
