"""Helpers for the API tests: database locks that hold lookups, and waiting for a condition."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from conntrack.api.read.repository import APPLICATION_NAME


@contextlib.asynccontextmanager
async def connections_locked(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """Holds ACCESS EXCLUSIVE on `connections` until the block ends: every Get blocks."""
    parsed = make_url(database_url)
    conn = await asyncpg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, database=parsed.database
    )
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("LOCK TABLE connections IN ACCESS EXCLUSIVE MODE")
        try:
            yield conn
        finally:
            await tx.rollback()
    finally:
        await conn.close()


async def api_sessions_waiting_on_locks(locker: asyncpg.Connection) -> int:
    return int(
        await locker.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = $1 AND wait_event_type = 'Lock'",
            APPLICATION_NAME,
        )
    )


async def eventually(predicate: Any, within: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


SERVING = health_pb2.HealthCheckResponse.SERVING


NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(answer.status)


async def serve_api(
    database_url: str, port: int, log_path: Path, **settings: str
) -> asyncio.subprocess.Process:
    """`python -m conntrack.api serve` on 127.0.0.1:port with its output in log_path (and these
    CONNTRACK_* settings, by lower-case name), once its health service answers SERVING."""
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "conntrack.api",
            "serve",
            stdout=log_file,
            stderr=log_file,
            env={
                **os.environ,
                "CONNTRACK_DATABASE_URL": database_url,
                "CONNTRACK_API_LISTEN": f"127.0.0.1:{port}",
                **{f"CONNTRACK_{name.upper()}": value for name, value in settings.items()},
            },
        )

    async def up() -> bool:
        try:
            return bool(await health_status(port) == SERVING)
        except grpc.aio.AioRpcError:
            return False

    try:
        await eventually(up, within=30)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return process
