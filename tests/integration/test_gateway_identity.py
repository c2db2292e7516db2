"""The reference gateway names who connects, as an operator runs it, on the real broker with
real WebSocket clients: tokens it must refuse get HTTP 401 and publish nothing; a valid one's
principal and labels travel in the Connected event, reach the directory, and a broadcast to a
principal reaches exactly that principal's sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conntrack.core.events import Connected, Disconnected
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2 as pb
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2_grpc as pb_grpc
from conntrack.core.settings import Settings
from tests.support.gateway import (
    GATEWAY,
    GatewayProcess,
    gateway_node,
    own_id,
    projector_and_api,
    with_command_topics,
)
from tests.support.kafka import read_events, unique
from tests.support.tokens import (
    Keys,
    claims,
    hs256_with_public_key,
    make_keys,
    sign,
    unsigned,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def jwt_env(keys: Keys) -> dict[str, str]:
    return {
        "CONNTRACK_GATEWAY_AUTH": "jwt",
        "CONNTRACK_GATEWAY_JWT_KEY_FILE": str(keys.rsa_pem),
        "CONNTRACK_GATEWAY_LABELS": "tenant=claim:tid,device=header:X-Device,app=query:v",
    }


def assert_clean(gateway: GatewayProcess) -> None:
    log = gateway.log()
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log


async def test_bad_tokens_are_401_with_no_event_and_a_valid_one_is_named(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    keys = make_keys(tmp_path)
    bad = {
        "expired": sign(claims(exp=1), keys.rsa_private, "RS256"),
        "wrong key": sign(claims(), keys.other_rsa_private, "RS256"),
        "alg none": unsigned(claims()),
        "wrong algorithm": hs256_with_public_key(claims(), keys.rsa_pem),
        "missing claim": sign({"exp": claims()["exp"]}, keys.rsa_private, "RS256"),
        "no token": "",
    }
    async with (
        with_command_topics(kafka_settings) as settings,
        gateway_node(settings, unique("node"), tmp_path / "gw.log", env=jwt_env(keys)) as gateway,
    ):
        for name, token in bad.items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            with pytest.raises(InvalidStatus) as refused:
                async with connect(gateway.url, additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 401, name
        token = sign(claims(tid="acme"), keys.rsa_private, "RS256")
        async with connect(
            f"{gateway.url}?v=2.1&access_token={token}", additional_headers={"X-Device": "ios"}
        ) as client:
            conn_id = own_id(client)
        # The gateway publishes as it closes; wait for the Disconnected.
        for _ in range(100):
            events = await read_events(settings.kafka_bootstrap_servers, settings.events_topic)
            if any(isinstance(e.payload, Disconnected) for e in events):
                break
            await asyncio.sleep(0.1)
        assert_clean(gateway)
    connection_events = [e for e in events if e.connection_id]
    assert {e.connection_id for e in connection_events} == {conn_id}  # none for the refused
    (connected,) = [e.payload for e in connection_events if isinstance(e.payload, Connected)]
    assert connected.principal == "alice"
    assert connected.labels == (("app", "2.1"), ("device", "ios"), ("tenant", "acme"))


async def test_a_tcp_probe_is_not_logged_and_a_non_http_client_is_one_line(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """A health check that connects and closes (compose's, a load balancer's) is ordinary; a
    client speaking something else than HTTP is the client's fault: neither is an ERROR."""
    async with (
        with_command_topics(kafka_settings) as settings,
        gateway_node(settings, unique("node"), tmp_path / "gw.log") as gateway,
    ):
        host, _, port = gateway.url.removeprefix("ws://").rstrip("/").rpartition(":")
        for probe in (b"", b"SSH-2.0-OpenSSH_9.6\r\n\r\n"):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(probe)
            await writer.drain()
            if probe:
                await reader.read()  # the gateway hangs up
            writer.close()
            await writer.wait_closed()
        async with connect(gateway.url):
            pass  # and the gateway still serves
        await asyncio.sleep(0.3)
        assert_clean(gateway)
        lines = [line for line in gateway.log().splitlines() if "handshake_failed" in line]
    assert len(lines) == 1, lines
    assert " INFO " in lines[0]


async def test_a_broadcast_to_a_principal_reaches_exactly_its_sockets(
    kafka_settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    keys = make_keys(tmp_path)

    def token(user: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {sign(claims(sub=user, tid='t1'), keys.rsa_private, 'RS256')}"
        }

    async with (
        with_command_topics(kafka_settings) as settings,
        projector_and_api(settings, engine) as system,
        grpc.aio.insecure_channel(f"127.0.0.1:{system.server.port}") as channel,
        gateway_node(settings, unique("node"), tmp_path / "gw.log", env=jwt_env(keys)) as gateway,
        contextlib.AsyncExitStack() as stack,
    ):
        alice = [
            await stack.enter_async_context(connect(gateway.url, additional_headers=token("alice")))
            for _ in range(2)
        ]
        bob = await stack.enter_async_context(connect(gateway.url, additional_headers=token("bob")))
        stub = pb_grpc.ConnectionDirectoryServiceStub(channel)
        alice_filter = pb.ConnectionFilter(principal="alice")
        for _ in range(200):
            listed = await stub.ListConnections(
                pb.ListConnectionsRequest(gateway_id=settings.gateway_id, filter=alice_filter)
            )
            if len(listed.connections) == 2:
                break
            await asyncio.sleep(0.1)
        assert sorted(e.connection.id for e in listed.connections) == sorted(map(own_id, alice))
        assert all(
            e.principal == "alice" and dict(e.labels) == {"tenant": "t1"}
            for e in listed.connections
        )
        answer = await stub.Broadcast(
            pb.BroadcastRequest(
                gateway_id=settings.gateway_id,
                filter=alice_filter,
                data=b"for alice",
                type=pb.BroadcastRequest.TEXT,
            ),
            timeout=30,
        )
        assert (answer.addressed, answer.delivered, answer.complete) == (2, 2, True)
        for client in alice:
            assert await asyncio.wait_for(client.recv(), 30) == "for alice"
        for client in [*alice, bob]:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.recv(), 1.0)
        assert_clean(gateway)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"CONNTRACK_GATEWAY_AUTH": "jwt", "CONNTRACK_GATEWAY_JWT_KEY_FILE": "/nonexistent"},
            "CONNTRACK_GATEWAY_JWT_KEY_FILE /nonexistent: No such file or directory",
        ),
        ({"CONNTRACK_GATEWAY_AUTH": "jwt"}, "CONNTRACK_GATEWAY_AUTH=jwt needs"),
        (
            {"CONNTRACK_GATEWAY_LABELS": "tenant=claim:tid"},
            "CONNTRACK_GATEWAY_LABELS takes claims only with CONNTRACK_GATEWAY_AUTH=jwt",
        ),
        ({"CONNTRACK_GATEWAY_AUTH": "oauth"}, "CONNTRACK_GATEWAY_AUTH / --gateway-auth"),
    ],
)
def test_identity_settings_that_cannot_work_stop_the_gateway_in_one_line(
    env: dict[str, str], says: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")}
    proc = subprocess.run(
        [str(GATEWAY)], env=clean | env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert says in proc.stderr
