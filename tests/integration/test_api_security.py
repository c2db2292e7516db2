"""Securing the API: TLS and mutual TLS from certificate files (made here with the openssl
CLI), bearer tokens on the `authorization` metadata, and tokens never reaching the logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.application.service import SERVICE_NAME
from conntrack.api.read.repository import ConnectionRepository, create_read_engine
from conntrack.api.transport.auth import BearerTokens
from conntrack.api.transport.server import ApiServer
from conntrack.api.transport.tls import ServerTls, client_credentials
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.schema import connections
from conntrack.core.settings import Settings
from tests.support.tls import make_ca, make_leaf

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])  # transport concerns, one backend

TOKEN_A = "tok-A-7f3c9e1d5b2a4c6e8f0a1b3c5d7e9f1a"
TOKEN_B = "tok-B-0d2e4f6a8c1b3d5e7f9a0c2e4b6d8f1e"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "test-ca")
    rogue = make_ca(d, "rogue-ca")
    server = make_leaf(
        d,
        "server",
        ca,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    )
    client = make_leaf(d, "client", ca, "extendedKeyUsage=clientAuth")
    rogue_client = make_leaf(d, "rogue-client", rogue, "extendedKeyUsage=clientAuth")
    return Pki(ca[0], *server, *client, rogue[0], *rogue_client)


@pytest.fixture
async def read_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_read_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(
            insert(connections).values(
                connection_id="conn-sec-1",
                gateway_id="gw-sec",
                source_ip="198.51.100.4",
                user_agent="sdk-test",
                connected_at_ns=1_700_000_000_000_000_001,
                last_active_at_ns=1_700_000_000_000_000_002,
            )
        )
    yield engine
    await engine.dispose()


@contextlib.asynccontextmanager
async def serving(engine: AsyncEngine, **options: Any) -> AsyncIterator[ApiServer]:
    async with ApiServer(ConnectionRepository(engine), "127.0.0.1:0", **options) as server:
        yield server


async def get_code(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] | None = None
) -> grpc.StatusCode:
    stub = svc_grpc.ConnectionServiceStub(channel)
    try:
        answer = await stub.Get(
            svc.GetConnectionRequest(connection_id="conn-sec-1"), timeout=10, metadata=metadata
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    assert answer.gateway_id == "gw-sec"
    return grpc.StatusCode.OK


async def secure_code(port: int, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        return await get_code(channel)


async def plaintext_code(port: int, metadata: Any = None) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await get_code(channel, metadata)


async def test_tls_serves_tls_clients_and_refuses_plaintext(
    read_engine: AsyncEngine, pki: Pki
) -> None:
    tls = ServerTls(pki.server_cert, pki.server_key)
    async with serving(read_engine, tls=tls) as server:
        assert server.port is not None
        assert await secure_code(server.port, client_credentials(pki.ca)) == grpc.StatusCode.OK
        assert await plaintext_code(server.port) == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the server's CA does not talk to it.
        untrusting = client_credentials(pki.rogue_ca)
        assert await secure_code(server.port, untrusting) == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_when_tls_is_off(read_engine: AsyncEngine, pki: Pki) -> None:
    async with serving(read_engine) as server:
        assert server.port is not None
        assert await plaintext_code(server.port) == grpc.StatusCode.OK
        tls_client = client_credentials(pki.ca)
        assert await secure_code(server.port, tls_client) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_admits_only_clients_of_the_ca(read_engine: AsyncEngine, pki: Pki) -> None:
    tls = ServerTls(pki.server_cert, pki.server_key, client_ca_file=pki.ca)
    async with serving(read_engine, tls=tls) as server:
        port = server.port
        assert port is not None
        with_cert = client_credentials(pki.ca, pki.client_cert, pki.client_key)
        assert await secure_code(port, with_cert) == grpc.StatusCode.OK
        assert await secure_code(port, client_credentials(pki.ca)) == grpc.StatusCode.UNAVAILABLE
        rogue = client_credentials(pki.ca, pki.rogue_client_cert, pki.rogue_client_key)
        assert await secure_code(port, rogue) == grpc.StatusCode.UNAVAILABLE


async def test_bearer_tokens_are_required_when_configured(
    read_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(read_engine, tokens=BearerTokens([TOKEN_A, TOKEN_B])) as server:
        port = server.port
        assert port is not None
        rejected: list[Any] = [
            None,
            (("authorization", "Bearer wrong-token"),),
            (("authorization", f"Bearer {TOKEN_A}x"),),
            (("authorization", f"Basic {TOKEN_A}"),),
            (("authorization", TOKEN_A),),
            (("x-token", f"Bearer {TOKEN_A}"),),
        ]
        for metadata in rejected:
            assert await plaintext_code(port, metadata) == grpc.StatusCode.UNAUTHENTICATED
        for token in (f"Bearer {TOKEN_A}", f"bearer {TOKEN_B}"):
            assert await plaintext_code(port, (("authorization", token),)) == grpc.StatusCode.OK

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = svc_grpc.ConnectionServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Disconnect(svc.DisconnectRequest(connection_id="c"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer" in (err.value.details() or "")
            # Probes stay open: health needs no token (docs/api.md says why).
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING

    assert server.metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "unary",
            "grpc_service": SERVICE_NAME,
            "grpc_method": "Get",
            "grpc_code": "Unauthenticated",
        },
    ) == len(rejected)
    assert "missing or invalid bearer token" in caplog.text  # the rejections were logged...
    for secret in (TOKEN_A, TOKEN_B, "wrong-token"):
        assert secret not in caplog.text  # ...without any credential


async def test_any_caller_is_served_when_tokens_are_off(read_engine: AsyncEngine) -> None:
    async with serving(read_engine) as server:
        assert server.port is not None
        assert await plaintext_code(server.port) == grpc.StatusCode.OK
        anything = (("authorization", "Bearer whatever"),)
        assert await plaintext_code(server.port, anything) == grpc.StatusCode.OK


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conntrack.api",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_configured_from_settings_and_cli_get_over_mutual_tls_with_a_token(
    read_engine: AsyncEngine, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# API tokens\n{TOKEN_B}\n\n")
    settings = Settings(
        api_listen="127.0.0.1:0",
        api_tls_cert_file=pki.server_cert,
        api_tls_key_file=pki.server_key,
        api_tls_client_ca_file=pki.ca,
        api_tokens=TOKEN_A,  # pydantic makes it a SecretStr
        api_tokens_file=tokens_file,
    )
    assert TOKEN_A not in repr(settings)
    client_token_file = tmp_path / "client-token"
    client_token_file.write_text(TOKEN_B + "\n")
    tls_args = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert)]
    tls_args += ["--tls-key", str(pki.client_key)]
    server = ApiServer.from_settings(ConnectionRepository(read_engine), settings)
    async with server:
        target = ["--target", f"127.0.0.1:{server.port}"]
        by_env = await run_cli(
            "get", "conn-sec-1", *target, *tls_args, env={"CONNTRACK_API_CLIENT_TOKEN": TOKEN_A}
        )
        by_file = await run_cli(
            "get", "conn-sec-1", *target, *tls_args, "--token-file", str(client_token_file), env={}
        )
        without_token = await run_cli("get", "conn-sec-1", *target, *tls_args, env={})
        without_cert = await run_cli("get", "conn-sec-1", *target, "--tls-ca", str(pki.ca), env={})
    for code, out, err in (by_env, by_file):
        assert code == 0, err
        assert json.loads(out)["identity"] == {"sourceIp": "198.51.100.4", "userAgent": "sdk-test"}
    assert without_token[0] == 1
    assert without_token[2].startswith("UNAUTHENTICATED: ")
    assert without_cert[0] == 69  # UNAVAILABLE: the server could not be reached
    assert without_cert[2].startswith("UNAVAILABLE: ")
    assert "bearer tokens: 2" in caplog.text
    assert TOKEN_A not in caplog.text
    assert TOKEN_B not in caplog.text
