"""Every status code ConnectionService answers, over a real channel, on both read-model
backends (and PostgreSQL-only where a table lock holds calls in flight)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.application.freshness import POSITION_HEADER, parse_positions
from conntrack.api.application.service import SERVICE_NAME
from conntrack.api.read.repository import APPLICATION_NAME, ConnectionRepository, create_read_engine
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
from conntrack.core.schema import connections, projection_offsets
from conntrack.core.timeutil import to_ns
from tests.support.api import api_sessions_waiting_on_locks, connections_locked, eventually

GET = f"/{SERVICE_NAME}/Get"


def handled(server: ApiServer, method: str, code: str) -> float | None:
    """grpc_server_handled_total of a ConnectionService method (e.g. "Get") and a grpc_code
    (spelled as go-grpc-prometheus does, e.g. "NotFound")."""
    return server.metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "unary",
            "grpc_service": SERVICE_NAME,
            "grpc_method": method,
            "grpc_code": code,
        },
    )


OPEN_ID = "conn-open-1"
CLOSED_ID = "conn-closed-1"
CONNECTED_NS = 1_764_300_000_123_456_789
ACTIVE_NS = 1_764_300_005_987_654_321


async def seed(engine: AsyncEngine) -> None:
    """One open and one disconnected connection, and a projection position."""
    async with engine.begin() as conn:
        await conn.execute(
            insert(connections),
            [
                {
                    "connection_id": OPEN_ID,
                    "gateway_id": "gw-1",
                    "source_ip": "2001:db8::7",
                    "user_agent": "Mozilla/5.0 (X11; Linux x86_64) тест",
                    "connected_at_ns": CONNECTED_NS,
                    "last_active_at_ns": ACTIVE_NS,
                    # executemany takes its columns from the first row: name them all.
                    "disconnected_at_ns": None,
                    "disconnect_status_code": None,
                },
                {
                    "connection_id": CLOSED_ID,
                    "gateway_id": "gw-1",
                    "source_ip": "10.1.2.3",
                    "user_agent": "okhttp/4.12.0",
                    "connected_at_ns": CONNECTED_NS,
                    "last_active_at_ns": CONNECTED_NS,
                    "disconnected_at_ns": ACTIVE_NS,
                    "disconnect_status_code": 1001,
                },
            ],
        )
        await conn.execute(
            insert(projection_offsets),
            [
                {"topic": "events-t", "partition": 0, "next_offset": 5},
                {"topic": "events-t", "partition": 1, "next_offset": 7},
            ],
        )


@pytest.fixture
async def read_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_read_engine(database_url, timeout_seconds=60)
    await seed(engine)
    yield engine
    await engine.dispose()


@contextlib.asynccontextmanager
async def serving(engine: AsyncEngine, **options: Any) -> AsyncIterator[ApiServer]:
    async with ApiServer(ConnectionRepository(engine), "127.0.0.1:0", **options) as server:
        yield server


@contextlib.asynccontextmanager
async def stub_for(server: ApiServer) -> AsyncIterator[svc_grpc.ConnectionServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield svc_grpc.ConnectionServiceStub(channel)


async def status_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def get_request(connection_id: str) -> svc.GetConnectionRequest:
    return svc.GetConnectionRequest(connection_id=connection_id)


async def test_get_answers_every_field_exactly_with_the_projection_position(
    read_engine: AsyncEngine,
) -> None:
    async with serving(read_engine) as server, stub_for(server) as stub:
        call = stub.Get(get_request(OPEN_ID), timeout=10)
        answer: connection_pb2.Connection = await call
        trailing = await call.trailing_metadata()
    assert answer.id == OPEN_ID
    assert answer.gateway_id == "gw-1"
    assert answer.identity.source_ip == "2001:db8::7"
    assert answer.identity.user_agent == "Mozilla/5.0 (X11; Linux x86_64) тест"
    assert to_ns(answer.connected_at) == CONNECTED_NS
    assert to_ns(answer.last_active_at) == ACTIVE_NS
    headers = dict(trailing or ())
    assert parse_positions(str(headers[POSITION_HEADER])) == {
        ("events-t", 0): 5,
        ("events-t", 1): 7,
    }


async def test_position_is_cached_for_its_ttl_and_then_reread(read_engine: AsyncEngine) -> None:
    async def position(stub: svc_grpc.ConnectionServiceStub) -> dict[tuple[str, int], int]:
        call = stub.Get(get_request(OPEN_ID), timeout=10)
        await call
        return parse_positions(str(dict(await call.trailing_metadata() or ())[POSITION_HEADER]))

    async def advance(to: int) -> None:
        async with read_engine.begin() as conn:
            await conn.execute(
                update(projection_offsets)
                .where(projection_offsets.c.partition == 0)
                .values(next_offset=to)
            )

    async with serving(read_engine, freshness_ttl_seconds=3600) as server, stub_for(server) as s:
        assert (await position(s))[("events-t", 0)] == 5
        await advance(11)
        assert (await position(s))[("events-t", 0)] == 5  # cached: no second query
    async with serving(read_engine, freshness_ttl_seconds=0) as server, stub_for(server) as s:
        assert (await position(s))[("events-t", 0)] == 11
        await advance(12)
        assert (await position(s))[("events-t", 0)] == 12


async def test_not_found_for_unknown_and_disconnected_with_position(
    read_engine: AsyncEngine,
) -> None:
    async with serving(read_engine) as server, stub_for(server) as stub:
        for connection_id in ("never-seen", CLOSED_ID):
            err = await failure(stub.Get(get_request(connection_id), timeout=10))
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert connection_id in (err.details() or "")
            # A NOT_FOUND is as fresh as its position says.
            assert POSITION_HEADER in dict(cast(Any, err.trailing_metadata()) or ())


@pytest.mark.parametrize(("connection_id", "length"), [("", 0), ("x" * 51, 51), ("🙂" * 51, 51)])
async def test_invalid_argument_names_the_field(
    read_engine: AsyncEngine, connection_id: str, length: int
) -> None:
    async with serving(read_engine) as server, stub_for(server) as stub:
        err = await failure(stub.Get(get_request(connection_id), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "connection_id" in (err.details() or "")
    if length:
        assert "at most 50 characters" in (err.details() or "")


async def test_fifty_characters_is_valid(read_engine: AsyncEngine) -> None:
    async with serving(read_engine) as server, stub_for(server) as stub:
        for connection_id in ("x" * 50, "🙂" * 50):
            err = await failure(stub.Get(get_request(connection_id), timeout=10))
            assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_undecodable_request_is_invalid_argument_not_unknown(
    read_engine: AsyncEngine,
) -> None:
    async with (
        serving(read_engine) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        raw = channel.unary_unary(GET, None, None)
        # Field 1 (string) holding bytes that are not UTF-8.
        err = await failure(raw(b"\x0a\x02\xff\xfe", timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "connection_id" in (err.details() or "")


async def test_send_and_disconnect_without_a_command_channel_are_unimplemented(
    read_engine: AsyncEngine,
) -> None:
    async with serving(read_engine) as server, stub_for(server) as stub:
        send = await failure(
            stub.Send(
                svc.SendToConnectionRequest(
                    connection_id=OPEN_ID,
                    data=b"x" * 131072,  # upstream's largest valid payload fits the limits
                    type=svc.SendToConnectionRequest.TEXT,
                ),
                timeout=10,
            )
        )
        disconnect = await failure(
            stub.Disconnect(svc.DisconnectRequest(connection_id=OPEN_ID), timeout=10)
        )
    assert send.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "no command channel" in (send.details() or "")
    assert disconnect.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "no command channel" in (disconnect.details() or "")


async def test_message_over_the_size_limit_is_resource_exhausted(
    read_engine: AsyncEngine,
) -> None:
    async with serving(read_engine, max_message_bytes=4096) as server, stub_for(server) as stub:
        err = await failure(
            stub.Send(svc.SendToConnectionRequest(connection_id="c", data=b"x" * 8192), timeout=10)
        )
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The server is fine afterwards.
        assert (await stub.Get(get_request(OPEN_ID), timeout=10)).id == OPEN_ID


# --- whatever the input: never INTERNAL or UNKNOWN --------------------------------------------


def _sync_codes(port: int, inputs: list[bytes]) -> list[grpc.StatusCode]:
    codes = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        raw = channel.unary_unary(GET, None, None)
        for body in inputs:
            try:
                raw(body, timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
    return codes


async def test_any_connection_id_gets_a_deliberate_status(read_engine: AsyncEngine) -> None:
    async with serving(read_engine) as server:
        port = server.port
        assert port is not None

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.text(max_size=80))
        @example("\x00")
        @example("a\x00b")
        @example("🙂" * 50)
        @example("🙂" * 51)
        @example("\U0010ffff" * 50)
        @example("'; DROP TABLE connections; --")
        @example("%")
        @example(OPEN_ID + "\x00")
        def check(connection_id: str) -> None:
            [code] = _sync_codes(port, [get_request(connection_id).SerializeToString()])
            if not connection_id or len(connection_id) > 50:
                assert code == grpc.StatusCode.INVALID_ARGUMENT
            elif connection_id == OPEN_ID:
                assert code == grpc.StatusCode.OK
            else:
                assert code == grpc.StatusCode.NOT_FOUND, (connection_id, code)

        await asyncio.to_thread(check)


async def test_any_request_bytes_get_a_deliberate_status(read_engine: AsyncEngine) -> None:
    async with serving(read_engine) as server:
        port = server.port
        assert port is not None

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.binary(max_size=200))
        @example(b"\x0a\x01\x80")
        @example(b"\x0a\xff\xff\xff\xff\x0f")
        @example(b"\xff")
        def check(body: bytes) -> None:
            [code] = _sync_codes(port, [body])
            assert code in (
                grpc.StatusCode.OK,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT,
            ), (body, code)

        await asyncio.to_thread(check)


# --- read model unavailable --------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _drop_database(url: str) -> None:
    parsed = make_url(url)
    conn = await asyncpg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, database="postgres"
    )
    try:
        await conn.execute(f'DROP DATABASE "{parsed.database}" WITH (FORCE)')
    finally:
        await conn.close()


async def _assert_unavailable(engine: AsyncEngine, **options: Any) -> None:
    async with serving(engine, db_timeout_seconds=5, **options) as server, stub_for(server) as s:
        for connection_id in (OPEN_ID, "never-seen"):
            err = await failure(s.Get(get_request(connection_id), timeout=20))
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert "retry" in (err.details() or "")
        assert server.metrics.registry.get_sample_value("conntrack_api_read_model_up") == 0


@pytest.mark.postgres
async def test_unavailable_when_postgres_is_not_listening() -> None:
    engine = create_read_engine(f"postgresql+asyncpg://conntrack@127.0.0.1:{_closed_port()}/x")
    try:
        await _assert_unavailable(engine)
    finally:
        await engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_unavailable_when_the_database_was_dropped(database_url: str) -> None:
    engine = create_read_engine(database_url)
    try:
        await seed(engine)
        await _drop_database(database_url)
        await _assert_unavailable(engine)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("content", [None, b"this is not an SQLite database file" * 100])
async def test_unavailable_when_the_sqlite_file_is_no_read_model(
    tmp_path: Path, content: bytes | None
) -> None:
    path = tmp_path / "readmodel.db"
    if content is not None:
        path.write_bytes(content)  # else: a fresh file without the tables
    engine = create_read_engine(f"sqlite+aiosqlite:///{path}")
    try:
        await _assert_unavailable(engine)
    finally:
        await engine.dispose()


# --- calls held in flight by a PostgreSQL table lock -------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_deadline_exceeded_promptly_and_the_work_is_freed(
    database_url: str, read_engine: AsyncEngine
) -> None:
    async with serving(read_engine, db_timeout_seconds=60) as server, stub_for(server) as stub:
        async with connections_locked(database_url) as locker:
            started = asyncio.get_running_loop().time()
            err = await failure(stub.Get(get_request(OPEN_ID), timeout=0.5))
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # Generous bound: "promptly" means long before the 60 s the server would wait.
            assert asyncio.get_running_loop().time() - started < 30

            async def freed() -> bool:
                return server.in_flight == 0 and await api_sessions_waiting_on_locks(locker) == 0

            # The handler was cancelled and its query with it, while the lock is still held.
            await eventually(freed)
        assert (await stub.Get(get_request(OPEN_ID), timeout=10)).id == OPEN_ID
    assert handled(server, "Get", "DeadlineExceeded") == 1


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_read_model_slower_than_its_timeout_is_unavailable(
    database_url: str, read_engine: AsyncEngine
) -> None:
    async with (
        serving(read_engine, db_timeout_seconds=0.5) as server,
        stub_for(server) as stub,
        connections_locked(database_url),
    ):
        err = await failure(stub.Get(get_request(OPEN_ID), timeout=30))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "did not answer within" in (err.details() or "")


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_calls_beyond_the_cap_are_resource_exhausted(
    database_url: str, read_engine: AsyncEngine
) -> None:
    async with (
        serving(read_engine, max_concurrent_calls=2, db_timeout_seconds=60) as server,
        stub_for(server) as stub,
    ):
        async with connections_locked(database_url):
            held = [
                asyncio.ensure_future(stub.Get(get_request(OPEN_ID), timeout=60)) for _ in range(2)
            ]

            async def both_in_flight() -> bool:
                return server.in_flight == 2

            await eventually(both_in_flight)
            err = await failure(stub.Get(get_request(OPEN_ID), timeout=10))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit 2" in (err.details() or "")
        # Released: the held calls complete normally, and the cap admits calls again.
        answers = await asyncio.gather(*held)
        assert [a.id for a in answers] == [OPEN_ID, OPEN_ID]
        assert (await stub.Get(get_request(OPEN_ID), timeout=10)).id == OPEN_ID
    assert handled(server, "Get", "ResourceExhausted") == 1
    assert handled(server, "Get", "OK") == 3


async def test_metrics_count_calls_by_method_and_code(read_engine: AsyncEngine) -> None:
    async with serving(read_engine) as server, stub_for(server) as stub:
        await stub.Get(get_request(OPEN_ID), timeout=10)
        await stub.Get(get_request(OPEN_ID), timeout=10)
        for call in (
            stub.Get(get_request("never-seen"), timeout=10),
            stub.Get(get_request(""), timeout=10),
            stub.Disconnect(svc.DisconnectRequest(connection_id=OPEN_ID), timeout=10),
        ):
            await status_of(call)
    registry = server.metrics.registry
    expected = {
        ("Get", "OK"): 2,
        ("Get", "NotFound"): 1,
        ("Get", "InvalidArgument"): 1,
        ("Disconnect", "Unimplemented"): 1,
    }
    for (method, code), count in expected.items():
        assert handled(server, method, code) == count
    for method, count in {"Get": 4, "Disconnect": 1, "Send": 0}.items():
        labels = {"grpc_type": "unary", "grpc_service": SERVICE_NAME, "grpc_method": method}
        assert registry.get_sample_value("grpc_server_started_total", labels) == count
        assert registry.get_sample_value("grpc_server_handling_seconds_count", labels) == count
    # Every other code of every method is there, at zero.
    assert handled(server, "Send", "Unavailable") == 0
    assert handled(server, "Get", "Unavailable") == 0


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_sessions_terminated_while_pooled_cost_callers_nothing(
    database_url: str, read_engine: AsyncEngine
) -> None:
    """No ping before use: a pooled connection that died is found by the query, dropped with the
    rest of the pool, and the read retried once, so the caller still gets OK."""
    parsed = make_url(database_url)
    admin = await asyncpg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, database=parsed.database
    )
    try:
        # No health probe in between: the Get itself must meet the dead connection.
        async with (
            serving(read_engine, health_interval_seconds=3600) as server,
            stub_for(server) as stub,
        ):
            assert (await stub.Get(get_request(OPEN_ID), timeout=10)).id == OPEN_ID
            sql = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = $1"
            )
            assert await admin.fetchval(sql, APPLICATION_NAME) >= 1
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = $1",
                APPLICATION_NAME,
            )
            for _ in range(200):  # terminated sessions leave pg_stat_activity shortly after
                if not await admin.fetchval(sql, APPLICATION_NAME):
                    break
                await asyncio.sleep(0.05)
            for _ in range(3):
                assert (await stub.Get(get_request(OPEN_ID), timeout=10)).id == OPEN_ID
    finally:
        await admin.close()
