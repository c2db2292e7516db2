"""Concurrent Gets share read-model queries (api/read/batching.py), over a real channel: every
caller still gets exactly its own answer, on both backends; on PostgreSQL a table lock holds queries
in flight, so the batching, a caller leaving a shared query, and a failing shared query can be
watched exactly (through the conntrack_api_read_* metrics)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from sqlalchemy import event, insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_only

from conntrack.api.read.repository import ConnectionRepository, create_read_engine
from conntrack.api.transport.server import ApiServer
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_pb2,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.schema import connections
from conntrack.core.timeutil import to_ns
from tests.support.api import api_sessions_waiting_on_locks, connections_locked, eventually

ROWS = 300
CONNECTED_NS = 1_764_300_000_000_000_000
ACTIVE_NS = 1_764_300_100_000_000_000


def row(i: int) -> dict[str, Any]:
    """Every third connection has disconnected; every seventh open one never saw its connected
    event (a row made by activity alone), which Get does not answer either."""
    return {
        "connection_id": f"batch-{i:03d}",
        "gateway_id": f"gw-{i % 5}",
        "source_ip": f"10.0.{i // 256}.{i % 256}",
        "user_agent": f"agent/{i}",
        "connected_at_ns": None if i % 7 == 0 else CONNECTED_NS + i,
        "last_active_at_ns": None if i % 2 else ACTIVE_NS + i,
        "disconnected_at_ns": ACTIVE_NS + 2 * i if i % 3 == 0 else None,
        "disconnect_status_code": None,
    }


def expected(connection_id: str) -> tuple[str, str, str, int, int] | None:
    """(gateway_id, source_ip, user_agent, connected_at, last_active_at) Get must answer, or
    None for NOT_FOUND."""
    if not connection_id.startswith("batch-") or not connection_id[6:].isdigit():
        return None
    i = int(connection_id[6:])
    if i >= ROWS or i % 3 == 0 or i % 7 == 0:
        return None
    last_active = CONNECTED_NS + i if i % 2 else ACTIVE_NS + i
    return (
        f"gw-{i % 5}",
        f"10.0.{i // 256}.{i % 256}",
        f"agent/{i}",
        CONNECTED_NS + i,
        last_active,
    )


@pytest.fixture
async def read_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_read_engine(database_url, timeout_seconds=60)
    async with engine.begin() as conn:
        await conn.execute(insert(connections), [row(i) for i in range(ROWS)])
    yield engine
    await engine.dispose()


@contextlib.asynccontextmanager
async def serving(
    engine: AsyncEngine,
    *,
    batch_max_ids: int = 256,
    batch_window_seconds: float = 0.0,
    **options: Any,
) -> AsyncIterator[tuple[ApiServer, svc_grpc.ConnectionServiceStub]]:
    repository = ConnectionRepository(
        engine, batch_max_ids=batch_max_ids, batch_window_seconds=batch_window_seconds
    )
    options.setdefault("max_concurrent_calls", 10_000)
    async with (
        ApiServer(repository, "127.0.0.1:0", **options) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield server, svc_grpc.ConnectionServiceStub(channel)


def metric(server: ApiServer, name: str) -> float:
    value = server.metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


async def get(
    stub: svc_grpc.ConnectionServiceStub, connection_id: str, deadline_s: float = 60
) -> tuple[grpc.StatusCode, connection_pb2.Connection | None]:
    try:
        answer = await stub.Get(
            svc.GetConnectionRequest(connection_id=connection_id), timeout=deadline_s
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code(), None
    return grpc.StatusCode.OK, answer


def check(
    connection_id: str, code: grpc.StatusCode, answer: connection_pb2.Connection | None
) -> None:
    want = expected(connection_id)
    if want is None:
        assert (code, answer) == (grpc.StatusCode.NOT_FOUND, None), connection_id
        return
    assert code == grpc.StatusCode.OK, (connection_id, code)
    assert answer is not None
    got = (
        answer.gateway_id,
        answer.identity.source_ip,
        answer.identity.user_agent,
        to_ns(answer.connected_at),
        to_ns(answer.last_active_at),
    )
    assert (answer.id, got) == (connection_id, want)


def mixed_ids() -> list[str]:
    """Open, disconnected, never-connected and unknown ids, each asked twice, and ids with a
    NUL (no stored id has one; PostgreSQL answers them without asking the database)."""
    ids = [f"batch-{i:03d}" for i in range(ROWS)]
    ids += [f"batch-{i:03d}" for i in range(ROWS, ROWS + 40)] + [f"unknown-{i}" for i in range(40)]
    ids += [f"batch-{i:03d}\x00" for i in range(0, ROWS, 30)]
    return [*ids, *reversed(ids)]


@pytest.mark.parametrize("window", [0.0, 0.003], ids=["no-window", "window-3ms"])
async def test_concurrent_gets_each_get_exactly_their_own_answer(
    read_engine: AsyncEngine, backend: str, window: float
) -> None:
    ids = mixed_ids()
    async with serving(read_engine, batch_max_ids=64, batch_window_seconds=window) as (
        server,
        stub,
    ):
        answers = await asyncio.gather(*(get(stub, i) for i in ids))
        queries = metric(server, "conntrack_api_read_queries_total")
        asked = metric(server, "conntrack_api_read_query_ids_total")
    for connection_id, (code, answer) in zip(ids, answers, strict=True):
        check(connection_id, code, answer)
    # PostgreSQL answers ids with a NUL without a query.
    lookups = len(ids) - (sum("\x00" in i for i in ids) if backend == "postgres" else 0)
    assert asked <= lookups
    assert lookups / 64 <= queries <= asked


@contextlib.asynccontextmanager
async def lookups_held(backend: str, database_url: str, engine: AsyncEngine) -> AsyncIterator[None]:
    """Every connection lookup that starts meanwhile waits until the block ends: on PostgreSQL
    for an ACCESS EXCLUSIVE lock on the table, on SQLite (whose readers nothing blocks) in a
    hook run just before SQLAlchemy sends the statement."""
    if backend == "postgres":
        async with connections_locked(database_url):
            yield
        return
    released = asyncio.Event()

    def hold(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "connections.connection_id IN (" in statement and not released.is_set():
            await_only(released.wait())  # hook code runs in SQLAlchemy's greenlet: may wait

    # Never removed: SQLAlchemy may still be iterating its listeners in the held statement.
    event.listen(engine.sync_engine, "before_cursor_execute", hold)
    try:
        yield
    finally:
        released.set()


async def test_gets_arriving_during_a_query_go_together_in_the_next_one(
    backend: str, database_url: str, read_engine: AsyncEngine
) -> None:
    later = [f"batch-{i:03d}" for i in range(1, 120)] + ["batch-001", "unknown-1", "batch-002"]
    async with serving(read_engine) as (server, stub):
        async with lookups_held(backend, database_url, read_engine):
            first = asyncio.ensure_future(get(stub, "batch-004"))

            async def first_in_flight() -> bool:
                return metric(server, "conntrack_api_read_queries_in_flight") == 1

            await eventually(first_in_flight)
            rest = [asyncio.ensure_future(get(stub, i)) for i in later]

            async def all_waiting() -> bool:
                return metric(server, "conntrack_api_read_waiting") == len(later)

            await eventually(all_waiting)
        check("batch-004", *await first)
        for connection_id, (code, answer) in zip(later, await asyncio.gather(*rest), strict=True):
            check(connection_id, code, answer)
        # One query for the first Get, one for everything that arrived while it ran (each id
        # asked once).
        assert metric(server, "conntrack_api_read_queries_total") == 2
        assert metric(server, "conntrack_api_read_query_ids_total") == 1 + len(set(later))


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_caller_leaving_a_shared_query_does_not_cancel_it_for_the_others(
    database_url: str, read_engine: AsyncEngine
) -> None:
    async with serving(read_engine, db_timeout_seconds=60) as (server, stub):
        async with connections_locked(database_url) as locker:
            # The only caller of the first query leaves: that query is cancelled.
            alone = stub.Get(svc.GetConnectionRequest(connection_id="batch-001"), timeout=60)
            alone_call = asyncio.ensure_future(alone)

            async def in_flight() -> bool:
                return metric(server, "conntrack_api_read_queries_in_flight") == 1

            await eventually(in_flight)
            impatient = asyncio.ensure_future(get(stub, "batch-002", deadline_s=3))
            patient = asyncio.ensure_future(get(stub, "batch-004"))

            async def both_waiting() -> bool:
                return metric(server, "conntrack_api_read_waiting") == 2

            await eventually(both_waiting)
            alone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await alone_call

            # The next query (both callers) starts and waits on the lock; the first one is gone.
            async def next_query_alone_on_the_lock() -> bool:
                return (
                    metric(server, "conntrack_api_read_waiting") == 0
                    and await api_sessions_waiting_on_locks(locker) == 1
                )

            await eventually(next_query_alone_on_the_lock)
            assert await impatient == (grpc.StatusCode.DEADLINE_EXCEEDED, None)
            await asyncio.sleep(1)  # the query kept running for the caller that stayed
            assert await api_sessions_waiting_on_locks(locker) == 1
            assert not patient.done()
        check("batch-004", *await patient)
        assert metric(server, "conntrack_api_read_queries_total") == 2


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_failing_shared_query_makes_every_caller_unavailable(database_url: str) -> None:
    # statement_timeout 0.5 s, while the API would wait 60 s: the query itself fails.
    engine = create_read_engine(database_url, timeout_seconds=0.5)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(connections), [row(i) for i in range(10)])
        async with serving(engine, db_timeout_seconds=60) as (server, stub):
            ids = [f"batch-{i:03d}" for i in range(10)]
            async with connections_locked(database_url):
                answers = await asyncio.gather(*(get(stub, i) for i in ids))
            assert answers == [(grpc.StatusCode.UNAVAILABLE, None)] * len(ids)
            assert metric(server, "conntrack_api_read_queries_total") < len(ids)
            # The server's session survived the refused statement and answers again.
            check("batch-001", *await get(stub, "batch-001"))
    finally:
        await engine.dispose()


async def test_stopping_the_server_gives_every_connection_back(read_engine: AsyncEngine) -> None:
    async with serving(read_engine) as (_, stub):
        answers = await asyncio.gather(*(get(stub, f"batch-{i:03d}") for i in range(50)))
        assert sum(code == grpc.StatusCode.OK for code, _ in answers) > 0
    assert read_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
