"""The API's log follows the ecosystem's conventions: a client that gives up (its deadline
passes, or it cancels the call) is ordinary, and leaves no ERROR line and no traceback in the
log of `conntrack-api serve` — on either backend, whether the call was waiting for a lookup,
for the projection position, for a connection being opened, or was about to be answered."""

from __future__ import annotations

import asyncio
import collections
import random
import signal
from pathlib import Path

import grpc
from sqlalchemy import insert

from conntrack.api.read.repository import create_read_engine
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.schema import connections
from tests.support.api import serve_api
from tests.support.ports import free_port

ROWS = 40


async def _seed(database_url: str) -> None:
    engine = create_read_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(connections),
                [
                    {
                        "connection_id": f"log-{i}",
                        "gateway_id": "gw",
                        "source_ip": "192.0.2.1",
                        "user_agent": "ua",
                        "connected_at_ns": 1_764_300_000_000_000_000 + i,
                        "last_active_at_ns": 1_764_300_000_000_000_000 + i,
                    }
                    for i in range(ROWS)
                ],
            )
    finally:
        await engine.dispose()


async def _impatient_clients(port: int, rounds: int) -> collections.Counter[str]:
    """Rounds of concurrent Gets (known and unknown ids) with deadlines of 1 to 15 ms, and
    calls the client cancels after a random moment; returns how the calls ended."""
    rng = random.Random(7)
    outcomes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = svc_grpc.ConnectionServiceStub(channel)

        async def with_deadline(i: int) -> str:
            request = svc.GetConnectionRequest(connection_id=f"log-{i % (2 * ROWS)}")
            try:
                await stub.Get(request, timeout=0.001 * (1 + i % 15))
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return "OK"

        async def cancelled(i: int) -> str:
            call = stub.Get(svc.GetConnectionRequest(connection_id=f"log-{i % ROWS}"), timeout=10)
            await asyncio.sleep(rng.random() * 0.01)
            call.cancel()
            try:
                await call
            except asyncio.CancelledError:
                return "CANCELLED (by the client)"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return "OK"

        for _ in range(rounds):
            outcomes.update(
                await asyncio.gather(
                    *(with_deadline(i) for i in range(60)), *(cancelled(i) for i in range(20))
                )
            )
    return outcomes


async def test_clients_giving_up_leave_no_error_in_the_log(
    database_url: str, tmp_path: Path
) -> None:
    await _seed(database_url)
    port = free_port()
    log_path = tmp_path / "serve.log"
    # A fresh position read on every call, so calls also give up during one.
    process = await serve_api(database_url, port, log_path, api_freshness_ttl_ms="0")
    try:
        outcomes = await _impatient_clients(port, rounds=40)
        # The server still answers, and the impatient clients did give up.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = svc_grpc.ConnectionServiceStub(channel)
            answer = await stub.Get(svc.GetConnectionRequest(connection_id="log-1"), timeout=10)
        assert answer.id == "log-1"
        assert outcomes["DEADLINE_EXCEEDED"] > 0, outcomes
        assert outcomes["CANCELLED (by the client)"] > 0, outcomes
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = log_path.read_text()
    assert "stopped" in log  # the log is complete
    problems = [
        line
        for line in log.splitlines()
        if " ERROR " in line
        or " CRITICAL " in line
        or "Traceback" in line
        or "never retrieved" in line
        or "was destroyed but it is pending" in line
    ]
    assert problems == [], log
