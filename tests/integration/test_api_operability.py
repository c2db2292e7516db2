"""Operating the API: health that follows the read model, reflection as grpcurl uses it, the
`conntrack-api` command (get prints JSON; serve drains in-flight calls on SIGTERM), and the
Prometheus endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.application.directory import DIRECTORY_SERVICE_NAME
from conntrack.api.application.service import SERVICE_NAME
from conntrack.api.read.repository import ConnectionRepository, create_read_engine
from conntrack.api.transport.server import ApiServer, listen_host
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.schema import connections
from conntrack.core.settings import Settings
from tests.support.api import (
    NOT_SERVING,
    SERVING,
    api_sessions_waiting_on_locks,
    connections_locked,
    eventually,
    health_status,
    serve_api,
)
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CONNECTED_NS = 1_764_300_000_123_456_789
ACTIVE_NS = 1_764_300_005_000_000_001


async def seed(engine: AsyncEngine, connection_id: str = "conn-ops-1") -> None:
    async with engine.begin() as conn:
        await conn.execute(
            insert(connections).values(
                connection_id=connection_id,
                gateway_id="gw-ops",
                source_ip="192.0.2.10",
                user_agent="curl/8.5.0",
                connected_at_ns=CONNECTED_NS,
                last_active_at_ns=ACTIVE_NS,
            )
        )


@pytest.fixture
async def read_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_read_engine(database_url)
    await seed(engine)
    yield engine
    await engine.dispose()


async def get_code(port: int, connection_id: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = svc_grpc.ConnectionServiceStub(channel)
        try:
            await stub.Get(svc.GetConnectionRequest(connection_id=connection_id), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


async def _pg_admin(sql: str) -> None:
    url = make_url(
        os.environ.get(
            "CONNTRACK_TEST_POSTGRES_URL", "postgresql://conntrack@127.0.0.1:55432/conntrack"
        )
    )
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database="postgres"
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def read_model_gone(database_url: str, engine: AsyncEngine) -> AsyncIterator[None]:
    """Takes the read model away for the block: on PostgreSQL the database refuses connections
    and its sessions are terminated; on SQLite the table disappears (renamed)."""
    name = make_url(database_url).database
    if make_url(database_url).get_backend_name() == "postgresql":
        await _pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await _pg_admin(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        )
        try:
            yield
        finally:
            await _pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    else:
        async with engine.begin() as conn:
            await conn.execute(text("ALTER TABLE connections RENAME TO connections_away"))
        try:
            yield
        finally:
            async with engine.begin() as conn:
                await conn.execute(text("ALTER TABLE connections_away RENAME TO connections"))


async def test_health_follows_the_read_model(database_url: str, read_engine: AsyncEngine) -> None:
    async with ApiServer(
        ConnectionRepository(read_engine), "127.0.0.1:0", health_interval_seconds=0.1
    ) as server:
        port = server.port
        assert port is not None
        for service in ("", SERVICE_NAME):
            assert await health_status(port, service) == SERVING

        async with read_model_gone(database_url, read_engine):

            async def not_serving() -> bool:
                return bool(await health_status(port) == NOT_SERVING)

            await eventually(not_serving)
            assert await health_status(port, SERVICE_NAME) == NOT_SERVING
            assert await get_code(port, "conn-ops-1") == grpc.StatusCode.UNAVAILABLE

        async def serving_again() -> bool:
            return bool(await health_status(port) == SERVING)

        await eventually(serving_again)
        assert await health_status(port, SERVICE_NAME) == SERVING
        assert await get_code(port, "conn-ops-1") == grpc.StatusCode.OK


def _reflection_get(port: int, connection_id: str) -> tuple[list[str], dict[str, Any]]:
    """What grpcurl does: learn the service and message types from the server, build the
    request dynamically, call, and decode the answer; no generated code is involved."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reflection_db = ProtoReflectionDescriptorDatabase(channel)
        services = list(reflection_db.get_services())
        pool = descriptor_pool.DescriptorPool(reflection_db)
        method = pool.FindServiceByName(SERVICE_NAME).FindMethodByName("Get")
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            f"/{SERVICE_NAME}/Get",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        # Fields of a class built at run time are known to the pool, not to the type checker:
        # fill them by name, as grpcurl does from its JSON input.
        request = json_format.ParseDict({"connection_id": connection_id}, request_class())
        answer = call(request, timeout=10)
        return services, {
            "type": answer.DESCRIPTOR.full_name,
            "id": answer.id,
            "gateway_id": answer.gateway_id,
            "source_ip": answer.identity.source_ip,
            "user_agent": answer.identity.user_agent,
            "connected_at": (answer.connected_at.seconds, answer.connected_at.nanos),
            "last_active_at": (answer.last_active_at.seconds, answer.last_active_at.nanos),
        }


async def test_reflection_based_call_as_grpcurl_makes(read_engine: AsyncEngine) -> None:
    async with ApiServer(ConnectionRepository(read_engine), "127.0.0.1:0") as server:
        assert server.port is not None
        services, answer = await asyncio.to_thread(_reflection_get, server.port, "conn-ops-1")
    assert SERVICE_NAME in services
    assert "grpc.health.v1.Health" in services
    assert answer == {
        "type": "yandex.cloud.serverless.apigateway.websocket.v1.Connection",
        "id": "conn-ops-1",
        "gateway_id": "gw-ops",
        "source_ip": "192.0.2.10",
        "user_agent": "curl/8.5.0",
        "connected_at": divmod(CONNECTED_NS, 1_000_000_000),
        "last_active_at": divmod(ACTIVE_NS, 1_000_000_000),
    }


def _reflect(
    port: int, version: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    """One request to grpc.reflection.<version>.ServerReflection, by raw stub: v1 and v1alpha
    messages have the same fields and numbers, so v1alpha's classes read and write both."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        answers = list(info(iter([request]), timeout=10))
    assert len(answers) == 1
    return answers[0]


def _list_services(port: int, version: str) -> list[str]:
    answer = _reflect(port, version, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert answer.HasField("list_services_response"), answer
    return [service.name for service in answer.list_services_response.service]


def _file_containing(port: int, version: str, symbol: str) -> list[FileDescriptorProto]:
    answer = _reflect(
        port, version, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    )
    assert answer.HasField("file_descriptor_response"), answer
    return [
        FileDescriptorProto.FromString(raw)
        for raw in answer.file_descriptor_response.file_descriptor_proto
    ]


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_reflection_answers_as_v1_and_as_v1alpha(read_engine: AsyncEngine) -> None:
    async with ApiServer(ConnectionRepository(read_engine), "127.0.0.1:0") as server:
        assert server.port is not None
        port = server.port
        listed = {v: await asyncio.to_thread(_list_services, port, v) for v in ("v1", "v1alpha")}
        files = {
            v: await asyncio.to_thread(_file_containing, port, v, SERVICE_NAME)
            for v in ("v1", "v1alpha")
        }
        v1_itself = await asyncio.to_thread(
            _file_containing, port, "v1", "grpc.reflection.v1.ServerReflection"
        )
    expected = {
        SERVICE_NAME,
        DIRECTORY_SERVICE_NAME,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert set(listed["v1"]) == expected
    assert set(listed["v1alpha"]) == expected
    for version in ("v1", "v1alpha"):
        services = {f"{f.package}.{s.name}" for f in files[version] for s in f.service}
        assert SERVICE_NAME in services
    # v1 describes itself under its own package, and the description builds.
    (v1_file,) = [f for f in v1_itself if f.package == "grpc.reflection.v1"]
    assert v1_file.name == "grpc/reflection/v1/reflection.proto"
    (method,) = v1_file.service[0].method
    assert (method.name, method.input_type, method.output_type) == (
        "ServerReflectionInfo",
        ".grpc.reflection.v1.ServerReflectionRequest",
        ".grpc.reflection.v1.ServerReflectionResponse",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(v1_file)
    built = pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    assert {f.name: f.number for f in built.fields} == {
        f.name: f.number for f in reflection_pb2.ServerReflectionResponse.DESCRIPTOR.fields
    }


def _grpcurl() -> str | None:
    local = REPO / ".local" / "go" / "bin" / "grpcurl"
    return shutil.which("grpcurl") or (str(local) if local.exists() else None)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_grpcurl_calls_get_without_proto_files(read_engine: AsyncEngine) -> None:
    grpcurl = _grpcurl()
    if grpcurl is None:
        pytest.skip("grpcurl not installed (docs/api.md says how); the reflection test covers it")
    async with ApiServer(ConnectionRepository(read_engine), "127.0.0.1:0") as server:
        process = await asyncio.create_subprocess_exec(
            grpcurl,
            "-plaintext",
            "-d",
            '{"connection_id": "conn-ops-1"}',
            f"127.0.0.1:{server.port}",
            f"{SERVICE_NAME}/Get",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    # grpcurl prints proto field names.
    assert json.loads(out) == {
        "id": "conn-ops-1",
        "gateway_id": "gw-ops",
        "identity": {"source_ip": "192.0.2.10", "user_agent": "curl/8.5.0"},
        "connected_at": "2025-11-28T03:20:00.123456789Z",
        "last_active_at": "2025-11-28T03:20:05.000000001Z",
    }


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conntrack.api",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_cli_get_prints_the_connection_as_json(read_engine: AsyncEngine) -> None:
    async with ApiServer(ConnectionRepository(read_engine), "127.0.0.1:0") as server:
        target = f"127.0.0.1:{server.port}"
        code, out, err = await run_cli("get", "conn-ops-1", "--target", target, "-v")
        missing = await run_cli("get", "nope", "--target", target)
    assert code == 0, err
    assert json.loads(out) == {
        "id": "conn-ops-1",
        "gatewayId": "gw-ops",
        "identity": {"sourceIp": "192.0.2.10", "userAgent": "curl/8.5.0"},
        "connectedAt": "2025-11-28T03:20:00.123456789Z",
        "lastActiveAt": "2025-11-28T03:20:05.000000001Z",
    }
    assert "x-projection-offsets:" in err
    assert missing[0] == 1
    assert missing[1] == ""
    assert missing[2].startswith("NOT_FOUND: ")


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_sigterm_drains_the_call_in_flight_and_exits_zero(
    database_url: str, read_engine: AsyncEngine, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    process = await serve_api(
        database_url,
        port,
        log_path,
        api_grace_seconds="30",
        api_db_timeout_seconds="30",
        metrics_port=str(metrics_port),
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = svc_grpc.ConnectionServiceStub(channel)
            async with connections_locked(database_url) as locker:
                in_flight = asyncio.ensure_future(
                    stub.Get(svc.GetConnectionRequest(connection_id="conn-ops-1"), timeout=60)
                )

                async def blocked_in_database() -> bool:
                    # The API's reads are held up by the lock (its readiness probes among them:
                    # the Get may wait for their connection rather than for the lock itself).
                    return await api_sessions_waiting_on_locks(locker) > 0

                async def get_in_the_server() -> bool:
                    families = await asyncio.to_thread(_scrape, "127.0.0.1", metrics_port)
                    started = _value(
                        families,
                        "grpc_server_started_total",
                        grpc_type="unary",
                        grpc_service=SERVICE_NAME,
                        grpc_method="Get",
                    )
                    return (started or 0) >= 1

                await eventually(blocked_in_database)
                await eventually(get_in_the_server)
                process.send_signal(signal.SIGTERM)

                async def refuses_new_calls() -> bool:
                    try:
                        await health_status(port)
                    except grpc.aio.AioRpcError:
                        return True
                    return False

                # Stopped accepting calls while the old one is still held by the lock.
                await eventually(refuses_new_calls)
                assert not in_flight.done()
            answer = await asyncio.wait_for(in_flight, 30)
            assert answer.id == "conn-ops-1"
        assert await asyncio.wait_for(process.wait(), 30) == 0, log_path.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = log_path.read_text()
    assert "received SIGTERM" in log
    assert "stopped" in log


def _scrape(host: str, port: int) -> dict[str, Metric]:
    url = f"http://{host}:{port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    return {family.name: family for family in text_string_to_metric_families(body)}


def _value(families: dict[str, Metric], sample: str, **labels: str) -> float | None:
    family = families[sample.removesuffix("_total").removesuffix("_count")]
    for s in family.samples:
        if s.name == sample and s.labels == labels:
            return float(s.value)
    return None


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_metrics_endpoint_counts_calls_as_grpc_prometheus_does(
    read_engine: AsyncEngine,
) -> None:
    async with ApiServer(
        ConnectionRepository(read_engine), "127.0.0.1:0", metrics_port=0
    ) as server:
        port = server.port
        assert port is not None
        for connection_id, code in [
            ("conn-ops-1", grpc.StatusCode.OK),
            ("conn-ops-1", grpc.StatusCode.OK),
            ("nope", grpc.StatusCode.NOT_FOUND),
            ("", grpc.StatusCode.INVALID_ARGUMENT),
            ("x" * 51, grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            assert await get_code(port, connection_id) == code
        for service in ("", SERVICE_NAME):
            assert await health_status(port, service) == SERVING
        listed = await asyncio.to_thread(_list_services, port, "v1")
        assert SERVICE_NAME in listed
        # The endpoint binds to the host the API listens on, not to every interface.
        assert server.metrics_http_host == "127.0.0.1"
        assert server.metrics_http_port is not None
        families = await asyncio.to_thread(_scrape, "127.0.0.1", server.metrics_http_port)

    call = {"grpc_type": "unary", "grpc_service": SERVICE_NAME}
    get = {**call, "grpc_method": "Get"}
    assert families["grpc_server_handled"].type == "counter"
    assert families["grpc_server_started"].type == "counter"
    assert families["grpc_server_handling_seconds"].type == "histogram"
    assert _value(families, "grpc_server_started_total", **get) == 5
    assert _value(families, "grpc_server_handling_seconds_count", **get) == 5
    assert _value(families, "grpc_server_handled_total", **get, grpc_code="OK") == 2
    assert _value(families, "grpc_server_handled_total", **get, grpc_code="NotFound") == 1
    assert _value(families, "grpc_server_handled_total", **get, grpc_code="InvalidArgument") == 2
    # Every code of every method exists from the start, at zero.
    assert _value(families, "grpc_server_handled_total", **get, grpc_code="Unavailable") == 0
    send = {**call, "grpc_method": "Send"}
    assert _value(families, "grpc_server_handled_total", **send, grpc_code="Unimplemented") == 0
    # Health checks and reflection are not traffic: only the project's services are counted.
    services = {
        s.labels["grpc_service"]
        for name in ("grpc_server_started", "grpc_server_handled", "grpc_server_handling_seconds")
        for s in families[name].samples
    }
    assert services == {SERVICE_NAME, DIRECTORY_SERVICE_NAME}
    handled = sum(
        s.value for s in families["grpc_server_handled"].samples if s.name.endswith("_total")
    )
    assert handled == 5
    # The collectors the default registry has, and the API's own metrics.
    assert "process_cpu_seconds" in families
    assert "process_resident_memory_bytes" in families
    assert "python_gc_collections" in families
    assert "python_info" in families
    assert _value(families, "conntrack_api_read_model_up") == 1
    assert _value(families, "conntrack_api_calls_in_flight") == 0
    assert _value(families, "conntrack_api_read_queries_total") == 3  # OK, OK, NOT_FOUND


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_metrics_endpoint_binds_to_the_configured_host(
    database_url: str, read_engine: AsyncEngine
) -> None:
    settings = Settings(
        database_url=database_url,
        api_listen="127.0.0.1:0",
        metrics_port=free_port(),
        api_metrics_host="127.0.0.2",
    )
    async with ApiServer.from_settings(ConnectionRepository(read_engine), settings) as server:
        assert server.metrics_http_host == "127.0.0.2"
        families = await asyncio.to_thread(_scrape, "127.0.0.2", settings.metrics_port)
    assert "grpc_server_handled" in families
    assert listen_host("0.0.0.0:50051") == "0.0.0.0"
    assert listen_host("[::]:50051") == "::"
    assert listen_host("localhost:50051") == "localhost"
    assert listen_host(":50051") == ""


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_serve_refuses_to_start_on_an_unusable_configuration(
    database_url: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        base = {"CONNTRACK_DATABASE_URL": database_url}
        in_use = await run_cli("serve", env={**base, "CONNTRACK_API_LISTEN": busy})
    missing_cert = await run_cli(
        "serve",
        env={
            **base,
            "CONNTRACK_API_LISTEN": "127.0.0.1:0",
            "CONNTRACK_API_TLS_CERT_FILE": str(tmp_path / "absent.crt"),
            "CONNTRACK_API_TLS_KEY_FILE": str(tmp_path / "absent.key"),
        },
    )
    half_tls = await run_cli(
        "serve",
        env={
            **base,
            "CONNTRACK_API_LISTEN": "127.0.0.1:0",
            "CONNTRACK_API_TLS_CERT_FILE": str(tmp_path / "absent.crt"),
        },
    )
    assert in_use[0] == 2
    assert f"cannot listen on {busy}" in in_use[2]
    assert missing_cert[0] == 2
    assert "cannot read TLS" in missing_cert[2]
    assert half_tls[0] == 2
    assert "needs both a certificate file and a key file" in half_tls[2]
