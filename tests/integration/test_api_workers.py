"""`conntrack-api serve` with several worker processes (api/process/workers.py) on the real read
model (SQLite and PostgreSQL) and the shared Kafka broker (each worker's command channel): calls
spread over the workers, a SIGKILLed worker is replaced while the others keep answering, the
supervisor serves the sum of the workers' metrics, SIGTERM drains every worker and exits 0, a
port held by another server is refused, a worker's start error ends the command in one line.

About the one retry allowed after the SIGKILL: a channel whose TCP connection went to the
killed worker sees that connection reset, and a call in flight on it (or sent before the
client noticed) fails UNAVAILABLE once; the channel then reconnects, and the kernel hands the
new connection to a live worker. Each call is retried at most once, on UNAVAILABLE only, after
0.2 s (as gRPC's own retryPolicy would, with a backoff: retried at once it may go out on the same
dead connection), and waits for the channel to be ready (wait_for_ready): a connection attempt
that lands on the dying worker's listener before the kernel has closed it is reset, and a
fail-fast call would give up on that instead of reconnecting."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert

from conntrack.api.application.service import SERVICE_NAME
from conntrack.api.read.repository import create_read_engine
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.schema import connections
from tests.support.api import SERVING, eventually, health_status, serve_api
from tests.support.ports import free_port

ROWS = 20
CHANNELS = 16  # each its own TCP connection, so the kernel spreads them over the workers
# Before the one retry: time for the channel to see its connection gone (a retry sent at once
# can go out on the same dead connection and fail the same way).
RETRY_BACKOFF_SECONDS = 0.2
GET_OK = {"grpc_method": "Get", "grpc_service": SERVICE_NAME, "grpc_type": "unary"}


async def _seed(database_url: str) -> None:
    engine = create_read_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(connections),
                [
                    {
                        "connection_id": f"wk-{i}",
                        "gateway_id": "gw-workers",
                        "source_ip": "192.0.2.7",
                        "user_agent": "ua",
                        "connected_at_ns": 1_764_300_000_000_000_000 + i,
                        "last_active_at_ns": 1_764_300_000_000_000_000 + i,
                    }
                    for i in range(ROWS)
                ],
            )
    finally:
        await engine.dispose()


def _channels(port: int) -> list[grpc.aio.Channel]:
    # A local subchannel pool: otherwise channels to one target share one connection.
    return [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(CHANNELS)
    ]


async def _gets(channels: list[grpc.aio.Channel], rounds: int) -> tuple[int, int]:
    """rounds x len(channels) Gets, every one answered with its connection; returns (calls
    that succeeded, retries they needed)."""
    retries = 0

    async def one(channel: grpc.aio.Channel, i: int) -> None:
        nonlocal retries
        stub = svc_grpc.ConnectionServiceStub(channel)
        request = svc.GetConnectionRequest(connection_id=f"wk-{i % ROWS}")
        try:
            answer = await stub.Get(request, timeout=10, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            retries += 1
            await asyncio.sleep(RETRY_BACKOFF_SECONDS)
            answer = await stub.Get(request, timeout=10, wait_for_ready=True)
        assert answer.id == f"wk-{i % ROWS}"

    for r in range(rounds):
        await asyncio.gather(*(one(c, r * CHANNELS + n) for n, c in enumerate(channels)))
    return rounds * len(channels), retries


def _scrape(port: int) -> dict[str, Metric]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def _get_ok(families: dict[str, Metric]) -> float:
    return sum(
        s.value
        for s in families["grpc_server_handled"].samples
        if s.name == "grpc_server_handled_total" and s.labels == {**GET_OK, "grpc_code": "OK"}
    )


def _calls_by_pid(families: dict[str, Metric]) -> dict[int, float]:
    family = families.get("conntrack_api_worker_calls_started")
    return {int(s.labels["pid"]): s.value for s in family.samples} if family else {}


def _worker_pids(log: str) -> dict[int, list[int]]:
    """worker index -> the pids it has had, in order, from the supervisor's lines."""
    pids: dict[int, list[int]] = {}
    for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", log):
        pids.setdefault(int(index), []).append(int(pid))
    return pids


def _list_services(port: int) -> list[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(info(iter([request]), timeout=10))
    return [service.name for service in answer.list_services_response.service]


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_two_workers_share_the_port_survive_a_sigkill_and_drain_on_sigterm(
    database_url: str, tmp_path: Path
) -> None:
    await _seed(database_url)
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    process = await serve_api(
        database_url, port, log_path, api_workers="2", metrics_port=str(metrics_port)
    )
    channels = _channels(port)
    try:

        async def both_serving() -> bool:
            return "with 2 workers" in log_path.read_text()

        await eventually(both_serving, within=60)
        first = _worker_pids(log_path.read_text())
        assert sorted(first) == [1, 2]
        pids = {first[1][0], first[2][0]}

        # Health and reflection answer on the shared port, whichever worker takes the call.
        assert await health_status(port) == SERVING
        assert await health_status(port, SERVICE_NAME) == SERVING
        assert SERVICE_NAME in await asyncio.to_thread(_list_services, port)

        # Calls spread over both workers; the supervisor's metrics are their sum.
        done, retries = await _gets(channels, rounds=10)
        assert retries == 0

        async def both_counted() -> bool:
            by_pid = _calls_by_pid(await asyncio.to_thread(_scrape, metrics_port))
            return set(by_pid) == pids and sum(by_pid.values()) >= done

        await eventually(both_counted, within=20)
        families = await asyncio.to_thread(_scrape, metrics_port)
        by_pid = _calls_by_pid(families)
        assert all(calls > 0 for calls in by_pid.values()), by_pid
        assert _get_ok(families) == done  # counted once each, by whichever worker served it

        # SIGKILL one worker: every call still succeeds (one retry each at most), and the
        # supervisor starts a replacement.
        victim = first[1][0]
        os.kill(victim, signal.SIGKILL)
        more, retries = await _gets(channels, rounds=10)
        done += more

        async def replaced() -> bool:
            log = log_path.read_text()
            return len(_worker_pids(log).get(1, [])) == 2 and (
                f"worker 1 (pid {_worker_pids(log)[1][1]}) serving" in log
            )

        await eventually(replaced, within=60)
        log = log_path.read_text()
        assert f"worker 1 (pid {victim}) was killed by SIGKILL" in log
        replacement = _worker_pids(log)[1][1]
        more, retries_after = await _gets(_channels(port), rounds=5)
        done += more
        assert retries_after == 0

        async def sum_settled() -> bool:
            return _get_ok(await asyncio.to_thread(_scrape, metrics_port)) == done

        # The killed worker's counts stay in the sum; its per-pid gauge is gone.
        await eventually(sum_settled, within=20)
        assert victim not in _calls_by_pid(await asyncio.to_thread(_scrape, metrics_port))
        assert process.returncode is None

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0, log_path.read_text()
    finally:
        for channel in channels:
            await channel.close(None)
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = log_path.read_text()
    assert "received SIGTERM, stopping 2 workers" in log
    for pid in (first[2][0], replacement):
        assert re.search(rf"\[worker \d pid {pid}\] received SIGTERM, shutting down", log)
        assert re.search(rf"worker \d \(pid {pid}\) exited with code 0", log)
    assert "all 2 workers stopped" in log
    assert "Traceback" not in log
    assert " ERROR " not in log


async def _serve_once(env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conntrack.api",
        "serve",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    )
    _, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return process.returncode, err.decode()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_port_held_by_another_server_is_refused(database_url: str) -> None:
    # A plain listener, and a grpc server with its Linux defaults (SO_REUSEPORT on): workers
    # must not join either.
    other = grpc.aio.server()
    grpc_port = other.add_insecure_port("127.0.0.1:0")
    await other.start()
    try:
        with socket.socket() as plain:
            plain.bind(("127.0.0.1", 0))
            plain.listen()
            for busy_port in (plain.getsockname()[1], grpc_port):
                busy = f"127.0.0.1:{busy_port}"
                code, err = await _serve_once(
                    {
                        "CONNTRACK_DATABASE_URL": database_url,
                        "CONNTRACK_API_LISTEN": busy,
                        "CONNTRACK_API_WORKERS": "2",
                    }
                )
                assert code == 2, err
                expected = f"conntrack-api: cannot start: cannot listen on {busy} (address in use?)"
                assert err.strip() == expected
    finally:
        await other.stop(None)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_missing_tls_or_token_file_is_one_line_before_any_worker_starts(
    database_url: str, tmp_path: Path
) -> None:
    code, err = await _serve_once(
        {
            "CONNTRACK_DATABASE_URL": database_url,
            "CONNTRACK_API_LISTEN": "127.0.0.1:0",
            "CONNTRACK_API_WORKERS": "2",
            "CONNTRACK_API_TLS_CERT_FILE": str(tmp_path / "absent.crt"),
            "CONNTRACK_API_TLS_KEY_FILE": str(tmp_path / "absent.key"),
        }
    )
    assert code == 2, err
    # Checked before any worker is forked: the one line is all there is.
    (line,) = err.strip().splitlines()
    missing = "No such file or directory"
    key = tmp_path / "absent.key"
    assert line == f"conntrack-api: cannot start: cannot read TLS key file {key}: {missing}"
    code, err = await _serve_once(
        {
            "CONNTRACK_DATABASE_URL": database_url,
            "CONNTRACK_API_LISTEN": "127.0.0.1:0",
            "CONNTRACK_API_WORKERS": "2",
            "CONNTRACK_API_TOKENS_FILE": str(tmp_path / "absent.tokens"),
        }
    )
    assert code == 2, err
    (line,) = err.strip().splitlines()
    tokens = tmp_path / "absent.tokens"
    assert line == f"conntrack-api: cannot start: cannot read token file {tokens}: {missing}"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_workers_stop_when_their_supervisor_is_killed(
    database_url: str, tmp_path: Path
) -> None:
    """A SIGKILLed supervisor cannot forward anything: each worker sees its pipe to the
    supervisor close, drains and exits, and the port is free again."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    process = await serve_api(database_url, port, log_path, api_workers="2")
    try:

        async def both_serving() -> bool:
            return "with 2 workers" in log_path.read_text()

        await eventually(both_serving, within=60)
        workers = [pids[0] for pids in _worker_pids(log_path.read_text()).values()]
        process.kill()
        await process.wait()

        async def workers_gone() -> bool:
            return not any(_alive(pid) for pid in workers)

        await eventually(workers_gone, within=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = log_path.read_text()
    for pid in workers:
        assert f"pid {pid}] the supervisor is gone, shutting down" in log
    with socket.socket() as again:
        # SO_REUSEADDR passes connections in TIME_WAIT, not a socket still bound to the port.
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_several_workers_on_a_unix_socket_is_one_line(
    database_url: str, tmp_path: Path
) -> None:
    code, err = await _serve_once(
        {
            "CONNTRACK_DATABASE_URL": database_url,
            "CONNTRACK_API_LISTEN": f"unix:{tmp_path / 'api.sock'}",
            "CONNTRACK_API_WORKERS": "2",
        }
    )
    assert code == 2, err
    assert err.strip().splitlines() == [
        "conntrack-api: CONNTRACK_API_WORKERS / --api-workers = 2: workers share a TCP port, and "
        f"CONNTRACK_API_LISTEN = 'unix:{tmp_path / 'api.sock'}' is a Unix socket; use 1"
    ]
