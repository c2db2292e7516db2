"""The REST mapping (api/transport/rest.py) with a real HTTP client (aiohttp) against a running
server on the real broker and read model: each route's answers and errors (grpc-gateway's status
JSON on the conventional HTTP status), the same answers as gRPC, Send and Disconnect reaching the
node through the command channel (a node played by the test, as in test_send.py, and a real
conntrack-gateway with a WebSocket client), path encoding, body limits, tokens, TLS, the shared
concurrency cap, deadlines, the OpenAPI document, workers and SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedOK

from conntrack.api.application.commands import CommandChannel
from conntrack.api.application.freshness import POSITION_AGE_HEADER, POSITION_HEADER
from conntrack.api.application.service import SERVICE_NAME
from conntrack.api.read.repository import ConnectionRepository
from conntrack.api.transport import openapi, rest
from conntrack.api.transport.auth import BearerTokens
from conntrack.api.transport.server import ApiServer
from conntrack.api.transport.tls import ServerTls
from conntrack.core.commands import CloseSocket, DataType, OutcomeStatus, SendFrame
from conntrack.core.fold import NodeState
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.projector.runner import Projector
from tests.support.api import connections_locked, eventually, serve_api
from tests.support.gateway import gateway_node, own_id, with_command_topics
from tests.support.kafka import create_topic, delete_topics, unique
from tests.support.node import PlayedNode, open_state
from tests.support.ports import free_port
from tests.support.projector import running
from tests.support.rest import Client, http, is_error, status
from tests.support.tls import make_ca, make_leaf

pytestmark = [pytest.mark.kafka]

CONNECTIONS = "/apigateways/websocket/v1/connections/"
MULTIBYTE_50 = "ж" * 25 + "€" * 24 + "😀"  # 50 code points, 2-, 3- and 4-byte UTF-8
ODD_ID = "a/b c%?#:send+é"  # every character that needs percent-encoding in a path segment
TOKEN = "tok-rest-5c1e9a7b3d"


def path_of(connection_id: str, suffix: str = "") -> str:
    return CONNECTIONS + urllib.parse.quote(connection_id, safe="") + suffix


@contextlib.asynccontextmanager
async def commands_server(
    kafka_settings: Settings, engine: AsyncEngine, **options: Any
) -> AsyncIterator[tuple[ApiServer, PlayedNode]]:
    """The API with a command channel and the REST port, the node played by the test (as in
    test_send.py), the connections of test_send.py plus a 50-character multibyte id and an id
    that needs percent-encoding, all held by node n1."""
    s = kafka_settings
    commands, outcomes = unique("commands"), unique("outcomes")
    await create_topic(s.kafka_bootstrap_servers, commands, 3)
    await create_topic(s.kafka_bootstrap_servers, outcomes, 3)
    store = ProjectionStore(engine)
    await store.positions(s.events_topic, [0])
    now = time.time_ns()
    states = {
        "on-node": open_state("on-node", "n1", 5, now),
        "old-start": open_state("old-start", "n1", 4, now),
        "plain": open_state("plain", None, None, now),
        "closed": open_state("closed", "n1", 5, now)._replace(
            disconnected_at_ns=now, disconnected_event_id="d", disconnect_status_code=1000
        ),
        MULTIBYTE_50: open_state(MULTIBYTE_50, "n1", 5, now),
        ODD_ID: open_state(ODD_ID, "n1", 5, now),
    }
    await store.apply_batch(
        s.events_topic, {0: (0, 1)}, states, {"n1": NodeState("n1", 5, now - 10**10, now, "gw")}
    )
    node = PlayedNode(s, commands, outcomes)
    playing = asyncio.create_task(node.run())
    channel = CommandChannel(s.kafka_bootstrap_servers, commands, outcomes)
    try:
        async with ApiServer(
            ConnectionRepository(engine),
            "127.0.0.1:0",
            commands=channel,
            command_timeout_seconds=2.0,
            rest_port=0,
            **options,
        ) as server:
            await eventually(lambda: _true(channel.ready), within=15)
            yield server, node
    finally:
        playing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await playing
        await delete_topics(s.kafka_bootstrap_servers, [commands, outcomes])


async def _true(value: bool) -> bool:
    return value


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_each_route_answers_as_grpc_does_and_send_disconnect_reach_the_node(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    async with (
        commands_server(kafka_settings, engine) as (server, node),
        http(server) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = svc_grpc.ConnectionServiceStub(channel)
        # Get: the Connection in the proto3 JSON mapping, equal field by field to gRPC's answer
        # (and to the CLI's rendering), the freshness metadata as headers.
        code, answer, headers = await client.call("GET", path_of("on-node"))
        assert code == 200, answer
        call = stub.Get(svc.GetConnectionRequest(connection_id="on-node"), timeout=10)
        expected = MessageToDict(await call, always_print_fields_with_no_presence=True)
        assert answer == expected
        assert set(answer) == {"id", "gatewayId", "identity", "connectedAt", "lastActiveAt"}
        assert answer["identity"] == {"sourceIp": "10.0.0.1", "userAgent": "ua"}
        assert answer["connectedAt"].endswith("Z")
        trailing = dict(await call.trailing_metadata())
        position = f"{kafka_settings.events_topic}:0=1"
        assert headers[POSITION_HEADER] == trailing[POSITION_HEADER] == position
        assert int(headers[POSITION_AGE_HEADER]) >= 0

        # Send (TEXT, BINARY at upstream's largest) and Disconnect: `{}` once the node has done
        # them, as the gRPC calls would.
        text = "привет, node".encode()
        largest = bytes(range(256)) * 512  # 131072 bytes
        sent = await client.call(
            "POST", path_of("on-node", ":send"), {"data": b64(text), "type": "TEXT"}
        )
        assert sent[:2] == (200, {}), sent
        assert sent[2][POSITION_HEADER] == f"{kafka_settings.events_topic}:0=1"
        # URL-safe base64 without padding and the enum's number are proto3 JSON too.
        urlsafe = base64.urlsafe_b64encode(largest).decode().rstrip("=")
        sent = await client.call("POST", path_of("on-node", ":send"), {"data": urlsafe, "type": 1})
        assert sent[:2] == (200, {}), sent
        assert (await client.call("DELETE", path_of("on-node")))[:2] == (200, {})
        actions = [(key, c.connection_id, c.action) for key, c in node.received]
        assert actions == [
            (b"n1", "on-node", SendFrame(text, DataType.TEXT)),
            (b"n1", "on-node", SendFrame(largest, DataType.BINARY)),
            (b"n1", "on-node", CloseSocket()),
        ]

        # Errors: the status JSON on the conventional HTTP status, nothing sent.
        for cid in ("never-seen", "closed", "old-start"):
            for method, suffix, body in (
                ("GET", "", None),
                ("POST", ":send", {"data": b64(b"x"), "type": "TEXT"}),
                ("DELETE", "", None),
            ):
                code, answer, _ = await client.call(method, path_of(cid, suffix), body)
                assert code == 404, (method, cid, answer)
                assert is_error(answer, grpc.StatusCode.NOT_FOUND, containing="not found"), answer
        send_errors: list[tuple[Any, str]] = [
            ({"data": b64(b"x" * 131073), "type": "BINARY"}, "at most 131072 bytes"),
            ({"data": b64(b"\xff\xfe"), "type": "TEXT"}, "valid UTF-8"),
            ({"data": "", "type": "TEXT"}, "data is required"),
            ({"type": "TEXT"}, "data is required"),
            ({"data": b64(b"x")}, "type must be BINARY or TEXT"),
            ({"data": b64(b"x"), "type": "FOO"}, "Invalid enum value FOO"),
            ({"data": "aGk!!", "type": "TEXT"}, "not base64"),
            ({"data": b64(b"x"), "type": "TEXT", "extra": 1}, 'no field named "extra"'),
            ({"data": 5, "type": "TEXT"}, "data"),
            ([1, 2], "must be a JSON object"),
            (b'{"data": "aGk=", "data": "aGk="}', "duplicate key"),
            (b"{not json", "not JSON"),
        ]
        for body, message in send_errors:
            code, answer, _ = await client.call("POST", path_of("on-node", ":send"), body)
            assert code == 400, (body, answer)
            assert is_error(answer, grpc.StatusCode.INVALID_ARGUMENT, containing=message), answer
        for method, suffix in (("GET", ""), ("DELETE", "")):
            code, answer, _ = await client.call(method, path_of("x" * 51, suffix))
            assert (code, answer["code"]) == (400, status(grpc.StatusCode.INVALID_ARGUMENT))
            assert "at most 50 characters, got 51" in answer["message"]
        code, answer, _ = await client.call(
            "POST", path_of("plain", ":send"), {"data": b64(b"x"), "type": "TEXT"}
        )
        assert code == 400
        assert is_error(answer, grpc.StatusCode.FAILED_PRECONDITION, containing="node role")
        # Routes and methods that do not exist.
        code, answer, _ = await client.call("GET", "/apigateways/websocket/v1/nothing")
        assert (code, answer["code"]) == (404, status(grpc.StatusCode.NOT_FOUND))
        code, answer, headers = await client.call("POST", path_of("on-node"), {})
        assert (code, answer["code"]) == (405, status(grpc.StatusCode.UNIMPLEMENTED))
        assert set(headers["Allow"].split(",")) == {"GET", "DELETE"}
        assert len(node.received) == 3

        # The node no longer holds the socket: NOT_FOUND; no outcome in time: UNAVAILABLE.
        node.answers["on-node"] = OutcomeStatus.CONNECTION_GONE
        code, answer, _ = await client.call("DELETE", path_of("on-node"))
        assert code == 404, answer
        assert "no longer holds it" in answer["message"]
        node.silent.add("on-node")
        code, answer, _ = await client.call("DELETE", path_of("on-node"))
        assert code == 503, answer
        assert is_error(answer, grpc.StatusCode.UNAVAILABLE, containing="no outcome from")

        # REST calls are counted under the gRPC method they map to.
        def handled(method: str, grpc_code: str) -> float:
            value = server.metrics.registry.get_sample_value(
                "grpc_server_handled_total",
                {
                    "grpc_type": "unary",
                    "grpc_service": SERVICE_NAME,
                    "grpc_method": method,
                    "grpc_code": grpc_code,
                },
            )
            return value or 0.0

        assert handled("Get", "OK") == 2  # one REST, one gRPC
        assert handled("Send", "InvalidArgument") == len(send_errors)
        assert handled("Disconnect", "Unavailable") == 1


async def test_encoded_and_multibyte_ids_in_the_path(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    async with commands_server(kafka_settings, engine) as (server, node), http(server) as client:
        for cid in (MULTIBYTE_50, ODD_ID):
            code, answer, _ = await client.call("GET", path_of(cid))
            assert (code, answer["id"]) == (200, cid), answer
            sent = await client.call("POST", path_of(cid, ":send"), {"data": b64(b"hi")})
            assert sent[0] == 400  # no type: the body was read, the id taken from the path
            body = {"data": b64(b"hi"), "type": "TEXT"}
            assert (await client.call("POST", path_of(cid, ":send"), body))[:2] == (200, {})
            assert (await client.call("DELETE", path_of(cid)))[:2] == (200, {})
        assert [(c.connection_id, c.action) for _, c in node.received] == [
            (MULTIBYTE_50, SendFrame(b"hi", DataType.TEXT)),
            (MULTIBYTE_50, CloseSocket()),
            (ODD_ID, SendFrame(b"hi", DataType.TEXT)),
            (ODD_ID, CloseSocket()),
        ]
        # Lower-case escapes and the id's own ":send" left unescaped decode the same way.
        lower = CONNECTIONS + urllib.parse.quote(MULTIBYTE_50, safe="").lower()
        assert (await client.call("GET", lower))[1]["id"] == MULTIBYTE_50
        raw_colon = CONNECTIONS + urllib.parse.quote(ODD_ID, safe=":")
        assert (await client.call("GET", raw_colon))[1]["id"] == ODD_ID
        # 51 characters, even when under 50 bytes would fit: INVALID_ARGUMENT.
        code, answer, _ = await client.call("GET", path_of(MULTIBYTE_50 + "ж"))
        assert code == 400, answer
        assert "got 51" in answer["message"]
        # Escapes that are not UTF-8: INVALID_ARGUMENT, not an id of their own.
        for raw in ("%FF", "ab%ED%A0%80"):
            code, answer, _ = await client.call("GET", CONNECTIONS + raw)
            assert code == 400, answer
            assert "valid UTF-8" in answer["message"]
        # ":send" percent-encoded is part of the id, not the verb: the plain resource has no
        # POST, and nothing is sent.
        code, answer, _ = await client.call(
            "POST", CONNECTIONS + "on-node%3Asend", {"data": b64(b"x"), "type": "TEXT"}
        )
        assert (code, answer["code"]) == (405, status(grpc.StatusCode.UNIMPLEMENTED)), answer
        assert len(node.received) == 4


async def test_an_over_long_body_is_refused_and_nothing_is_sent(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    async with (
        commands_server(kafka_settings, engine, max_message_bytes=200_000) as (server, node),
        http(server) as client,
    ):
        # Over the body limit (the gRPC message limit): 413, before any JSON is parsed.
        big = json.dumps({"data": "A" * 200_000, "type": "BINARY"}).encode()
        code, answer, _ = await client.call("POST", path_of("on-node", ":send"), big)
        assert code == 413, answer
        assert is_error(answer, grpc.StatusCode.RESOURCE_EXHAUSTED, containing="200000 bytes")
        # Within the body limit but over upstream's data limit: 400.
        data = b64(b"x" * 131073)
        code, answer, _ = await client.call(
            "POST", path_of("on-node", ":send"), {"data": data, "type": "BINARY"}
        )
        assert (code, answer["code"]) == (400, status(grpc.StatusCode.INVALID_ARGUMENT))
        await asyncio.sleep(0.5)  # anything sent would have reached the node by now
        assert node.received == []


@pytest.mark.parametrize("backend", ["postgres"])
async def test_bearer_tokens_and_the_openapi_document(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    async with (
        commands_server(kafka_settings, engine, tokens=BearerTokens([TOKEN])) as (server, node),
        http(server) as client,
    ):
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": TOKEN},
        ):
            for method, suffix, body in (
                ("GET", "", None),
                ("POST", ":send", {"data": b64(b"x"), "type": "TEXT"}),
                ("DELETE", "", None),
            ):
                code, answer, answer_headers = await client.call(
                    method, path_of("on-node", suffix), body, headers=headers
                )
                assert code == 401, (headers, answer)
                assert is_error(answer, grpc.StatusCode.UNAUTHENTICATED, containing="bearer")
                assert answer_headers["WWW-Authenticate"] == "Bearer"
        assert node.received == []
        good = {"Authorization": f"bearer {TOKEN}"}
        assert (await client.call("GET", path_of("on-node"), headers=good))[0] == 200
        body = {"data": b64(b"x"), "type": "TEXT"}
        sent = await client.call("POST", path_of("on-node", ":send"), body, headers=good)
        assert sent[:2] == (200, {})
        assert len(node.received) == 1

        # The document needs no token, names the scheme, and lists exactly the routes served.
        code, document, _ = await client.call("GET", rest.OPENAPI_PATH)
        assert code == 200
        assert document == json.loads(json.dumps(openapi.document(secured=True)))
        assert document["openapi"].startswith("3.1")
        assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        documented = {
            (path, method.upper())
            for path, operations in document["paths"].items()
            for method in operations
        }
        assert server.rest_app is not None
        registered = {
            (route.resource.canonical, route.method)
            for route in server.rest_app.router.routes()
            if route.resource is not None
        }
        assert documented == registered
        assert {
            ("/apigateways/websocket/v1/connections/{connectionId}", "GET"),
            ("/apigateways/websocket/v1/connections/{connectionId}:send", "POST"),
            ("/apigateways/websocket/v1/connections/{connectionId}", "DELETE"),
            ("/conntrack/directory/v1/gateways/{gatewayId}/connections", "GET"),
            ("/conntrack/directory/v1/gateways/{gatewayId}/connections:count", "GET"),
            ("/conntrack/directory/v1/gateways/{gatewayId}/connections:broadcast", "POST"),
            ("/conntrack/directory/v1/gateways/{gatewayId}/connections:send", "POST"),
            ("/conntrack/directory/v1/gateways/{gatewayId}/connections:disconnect", "POST"),
            ("/conntrack/directory/v1/connections/{connectionId}:asOf", "GET"),
            ("/conntrack/directory/v1/gateways/{gatewayId}/principals:lastSeen", "GET"),
            ("/conntrack/directory/v1/gateways/{gatewayId}/principals:sessions", "GET"),
            ("/openapi.json", "GET"),
        } == registered
        send_body = document["paths"][f"{CONNECTIONS}{{connectionId}}:send"]["post"]
        schema_ref = send_body["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        body_schema = document["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
        assert set(body_schema["properties"]) == {"data", "type"}
        assert body_schema["properties"]["type"]["enum"] == [
            "DATA_TYPE_UNSPECIFIED",
            "BINARY",
            "TEXT",
        ]


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_concurrency_cap_is_shared_with_grpc_and_deadlines_are_kept(
    kafka_settings: Settings, engine: AsyncEngine, database_url: str
) -> None:
    async with (
        commands_server(kafka_settings, engine, max_concurrent_calls=1, db_timeout_seconds=30) as (
            server,
            _,
        ),
        http(server) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = svc_grpc.ConnectionServiceStub(channel)
        async with connections_locked(database_url):
            held = asyncio.ensure_future(client.call("GET", path_of("on-node")))
            await eventually(lambda: _true(server.in_flight == 1))
            code, answer, _ = await client.call("GET", path_of("on-node"))
            assert code == 429, answer
            assert is_error(answer, grpc.StatusCode.RESOURCE_EXHAUSTED, containing="limit 1")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Get(svc.GetConnectionRequest(connection_id="on-node"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await held)[0] == 200
        async with connections_locked(database_url):
            # The caller's deadline (grpc-timeout, as grpc-gateway reads it): 504 when it passes.
            started = time.monotonic()
            code, answer, _ = await client.call(
                "GET", path_of("on-node"), headers={"grpc-timeout": "300m"}
            )
            assert code == 504, answer
            assert is_error(answer, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert time.monotonic() - started < 5
            code, answer, _ = await client.call(
                "GET", path_of("on-node"), headers={"grpc-timeout": "soon"}
            )
            assert (code, answer["code"]) == (400, status(grpc.StatusCode.INVALID_ARGUMENT))
        await eventually(lambda: _true(server.in_flight == 0))


@pytest.mark.parametrize("backend", ["postgres"])
async def test_rest_uses_the_api_tls(
    kafka_settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path, "rest-ca")
    server_cert, server_key = make_leaf(
        tmp_path, "rest-server", ca, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"
    )
    client_cert, client_key = make_leaf(tmp_path, "rest-client", ca, "extendedKeyUsage=clientAuth")
    tls = ServerTls(server_cert, server_key, client_ca_file=ca[0])
    async with commands_server(kafka_settings, engine, tls=tls) as (server, _):
        trusting = ssl.create_default_context(cafile=str(ca[0]))
        trusting.load_cert_chain(client_cert, client_key)
        async with http(server, "https") as client:
            code, answer, _ = await client.call("GET", path_of("on-node"), ssl=trusting)
            assert (code, answer["id"]) == (200, "on-node")
            # No client certificate (mutual TLS): refused in the handshake.
            anonymous = ssl.create_default_context(cafile=str(ca[0]))
            with pytest.raises(aiohttp.ClientError):
                await client.call("GET", path_of("on-node"), ssl=anonymous)
        async with http(server) as plain:  # plaintext HTTP to the TLS port
            with pytest.raises(aiohttp.ClientError):
                await plain.call("GET", path_of("on-node"))


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_serve_starts_rest_and_sigterm_drains_it(
    database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    grpc_port, rest_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    process = await serve_api(
        database_url,
        grpc_port,
        log_path,
        api_rest_port=str(rest_port),
        api_workers="1",
        api_grace_seconds="30",
        api_db_timeout_seconds="30",
    )
    try:
        async with aiohttp.ClientSession() as session:
            client = Client(session, f"http://127.0.0.1:{rest_port}")
            code, answer, _ = await client.call("GET", path_of("nobody"))
            assert (code, answer["code"]) == (404, status(grpc.StatusCode.NOT_FOUND))
            async with connections_locked(database_url):
                in_flight = asyncio.ensure_future(client.call("GET", path_of("nobody")))
                await asyncio.sleep(0.5)
                process.send_signal(signal.SIGTERM)

                async def refuses_new_calls() -> bool:
                    # A call still accepted would wait on the lock: given up on, it says no.
                    try:
                        async with aiohttp.ClientSession() as fresh:
                            await Client(fresh, client.base).call(
                                "GET", path_of("nobody"), timeout=aiohttp.ClientTimeout(total=1)
                            )
                    except aiohttp.ClientConnectionError:
                        return True
                    except TimeoutError:
                        return False
                    return False

                await eventually(refuses_new_calls)
                assert not in_flight.done()
            code, answer, _ = await asyncio.wait_for(in_flight, 30)
            assert code == 404, answer
        assert await asyncio.wait_for(process.wait(), 30) == 0, log_path.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = log_path.read_text()
    assert f"REST mapping on 127.0.0.1:{rest_port}" in log
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log


async def _serve_once(env: dict[str, str]) -> tuple[int, str]:
    """`conntrack-api serve` expected to refuse to start: its exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conntrack.api",
        "serve",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_workers_share_the_rest_port_and_a_held_one_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    grpc_port, rest_port = free_port(), free_port()
    process = await serve_api(
        database_url,
        grpc_port,
        tmp_path / "serve.log",
        api_rest_port=str(rest_port),
        api_workers="2",
    )
    try:
        # Each session its own connection: the kernel spreads them over the workers.
        for _ in range(8):
            async with aiohttp.ClientSession() as session:
                code, answer, _ = await Client(session, f"http://127.0.0.1:{rest_port}").call(
                    "GET", path_of("nobody")
                )
                assert (code, answer["code"]) == (404, status(grpc.StatusCode.NOT_FOUND))
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        busy = plain.getsockname()[1]
        for workers, expected in (
            ("2", f"cannot listen on 127.0.0.1:{busy} (address in use?)"),
            ("1", f"cannot listen on 127.0.0.1:{busy} for REST (address in use?)"),
        ):
            code, err = await _serve_once(
                {
                    "CONNTRACK_DATABASE_URL": database_url,
                    "CONNTRACK_API_LISTEN": "127.0.0.1:0",
                    "CONNTRACK_API_REST_PORT": str(busy),
                    "CONNTRACK_API_WORKERS": workers,
                }
            )
            assert code == 2, err
            assert err.strip().splitlines()[-1] == f"conntrack-api: cannot start: {expected}", err
            assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgres"])
async def test_rest_reaches_a_real_client_through_the_gateway_node(
    kafka_settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    """conntrack-gateway holding a real WebSocket client, the projector folding its events, the
    API with the REST port: Get finds it, Send's frames arrive byte for byte, Disconnect closes
    it with 1000, all over REST."""
    async with (
        with_command_topics(kafka_settings) as settings,
        running(Projector(settings, ProjectionStore(engine))),
        ApiServer(
            ConnectionRepository(engine),
            "127.0.0.1:0",
            freshness_ttl_seconds=0,
            commands=CommandChannel(
                settings.kafka_bootstrap_servers,
                settings.commands_topic,
                settings.command_outcomes_topic,
            ),
            command_timeout_seconds=20,
            rest_port=0,
        ) as server,
        http(server) as client,
        gateway_node(settings, unique("gw-node"), tmp_path / "gateway.log") as gateway,
        connect(gateway.url, user_agent_header="rest-e2e ✓") as socket_client,
    ):
        cid = own_id(socket_client)

        async def found() -> bool:
            return (await client.call("GET", path_of(cid)))[0] == 200

        await eventually(found, within=60)
        code, answer, _ = await client.call("GET", path_of(cid))
        assert (code, answer["id"], answer["gatewayId"]) == (200, cid, settings.gateway_id)
        assert answer["identity"] == {"sourceIp": "127.0.0.1", "userAgent": "rest-e2e ✓"}
        binary = bytes(range(256)) * 512  # 131072 bytes
        for data, kind in (("привет ✓".encode(), "TEXT"), (binary, "BINARY")):
            body = {"data": b64(data), "type": kind}
            sent = await client.call("POST", path_of(cid, ":send"), body, timeout=_LONG)
            assert sent[:2] == (200, {}), sent
            frame = await asyncio.wait_for(socket_client.recv(), 30)
            assert frame == (data.decode() if kind == "TEXT" else data)
        assert (await client.call("DELETE", path_of(cid), timeout=_LONG))[:2] == (200, {})
        with pytest.raises(ConnectionClosedOK):
            await asyncio.wait_for(socket_client.recv(), 30)
        assert socket_client.close_code == 1000

        async def gone() -> bool:
            return (await client.call("GET", path_of(cid)))[0] == 404

        await eventually(gone, within=60)
        assert await gateway.terminate() == 0
        assert "Traceback" not in gateway.log()


_LONG = aiohttp.ClientTimeout(total=60)
