"""The gateway node end to end, once per read-model backend: `conntrack-gateway` (a subprocess)
holds real `websockets` clients, the projector folds its events, the API answers Get and delivers
Send and Disconnect through the command channel to the node, on the real broker. A node killed
with SIGKILL loses its connections once its lease has passed; started again with the same node
id, only its new connections are visible. After each run the read model is still the fold of the
log (verify)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.settings import Settings
from tests.support.gateway import (
    SECOND,
    GatewayProcess,
    gateway_node,
    get_status,
    own_id,
    projector_and_api,
    send_request,
    status_of,
    verified,
    wait_for_get,
    with_command_topics,
)
from tests.support.kafka import unique

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

USER_AGENT = "gateway-e2e/1.0 ✓"
TEXT = svc.SendToConnectionRequest.TEXT
BINARY = svc.SendToConnectionRequest.BINARY
LEASE_SECONDS = 2.0


async def received(client: ClientConnection, within: float = 30) -> str | bytes:
    return await asyncio.wait_for(client.recv(), within)


def assert_clean(gateway: GatewayProcess) -> None:
    log = gateway.log()
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log


async def test_get_send_and_disconnect_reach_a_real_client_through_the_gateway_node(
    kafka_settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    node_id = unique("gw-node")
    async with (
        with_command_topics(kafka_settings) as settings,
        projector_and_api(settings, engine) as system,
        gateway_node(settings, node_id, tmp_path / "gateway.log") as gateway,
    ):
        stub = system.stub
        before = time.time_ns()
        async with (
            connect(gateway.url, user_agent_header=USER_AGENT) as client,
            connect(gateway.url, user_agent_header=USER_AGENT) as other,
        ):
            cid, other_id = own_id(client), own_id(other)
            assert len(cid) == 32
            assert cid != other_id

            # Get finds it, with what the node said of it.
            await wait_for_get(stub, cid, "OK")
            await wait_for_get(stub, other_id, "OK")
            answer = await stub.Get(svc.GetConnectionRequest(connection_id=cid), timeout=30)
            assert answer.id == cid
            assert answer.gateway_id == settings.gateway_id
            assert answer.identity.source_ip == "127.0.0.1"
            assert answer.identity.user_agent == USER_AGENT
            connected_ns = answer.connected_at.ToNanoseconds()
            assert before - 5 * SECOND <= connected_ns <= time.time_ns() + 5 * SECOND
            assert answer.last_active_at.ToNanoseconds() >= connected_ns
            node = (await system.store.nodes())[node_id]
            state = (await system.store.all_states())[cid]
            assert (state.node_id, state.node_incarnation) == (node_id, node.incarnation)

            # TEXT and BINARY, small and upstream's largest (131072 bytes), byte for byte.
            largest_text = ("é" * 65_536).encode()
            largest_binary = os.urandom(131_072)
            assert len(largest_text) == len(largest_binary) == 131_072
            for data, kind in (
                ("hello ✓".encode(), TEXT),
                (b"\x00\xff\x01binary", BINARY),
                (largest_text, TEXT),
                (largest_binary, BINARY),
            ):
                assert await status_of(stub.Send(send_request(cid, data, kind), timeout=30)) == (
                    "OK",
                    "",
                )
                frame = await received(client)
                assert frame == (data.decode() if kind == TEXT else data)

            # One byte more: INVALID_ARGUMENT, and nothing reaches the client: the next frame
            # it receives is the one sent after.
            for kind in (TEXT, BINARY):
                too_long = await status_of(
                    stub.Send(send_request(cid, b"x" * 131_073, kind), timeout=30)
                )
                assert too_long[0] == "INVALID_ARGUMENT", too_long
                assert "at most 131072 bytes" in too_long[1]
            assert await status_of(stub.Send(send_request(cid, b"after"), timeout=30)) == (
                "OK",
                "",
            )
            assert await received(client) == "after"

            # Unknown: NOT_FOUND for both methods.
            unknown = uuid.uuid4().hex
            assert (await status_of(stub.Send(send_request(unknown, b"x"), timeout=30)))[0] == (
                "NOT_FOUND"
            )
            assert (
                await status_of(
                    stub.Disconnect(svc.DisconnectRequest(connection_id=unknown), timeout=30)
                )
            )[0] == "NOT_FOUND"

            # Closed by its client: NOT_FOUND at once (the node no longer holds the socket, or
            # the read model already says so) and once the projector has its Disconnected.
            await other.close()
            assert (await status_of(stub.Send(send_request(other_id, b"x"), timeout=30)))[0] == (
                "NOT_FOUND"
            )
            await wait_for_get(stub, other_id, "NOT_FOUND", lambda d: "disconnected" in d)
            closed = await status_of(stub.Send(send_request(other_id, b"x"), timeout=30))
            assert closed[0] == "NOT_FOUND", closed
            assert "unknown or disconnected" in closed[1]

            # Disconnect closes the client's socket with 1000; Get then answers NOT_FOUND.
            assert await status_of(
                stub.Disconnect(svc.DisconnectRequest(connection_id=cid), timeout=30)
            ) == ("OK", "")
            with pytest.raises(ConnectionClosedOK):
                await received(client)
            assert client.close_code == 1000
            await wait_for_get(stub, cid, "NOT_FOUND", lambda d: "disconnected" in d)
            assert (await status_of(stub.Send(send_request(cid, b"x"), timeout=30)))[0] == (
                "NOT_FOUND"
            )
            assert (
                await status_of(
                    stub.Disconnect(svc.DisconnectRequest(connection_id=cid), timeout=30)
                )
            )[0] == "NOT_FOUND"

        assert await gateway.terminate() == 0
        assert_clean(gateway)
        # The read model is the fold of the log.
        result = await verified(settings, engine, system.store)
        assert result.ok, (result.differences, result.node_differences)
        assert result.compared == 2
        states = await system.store.all_states()
        assert states[cid].disconnect_status_code == 1000  # the API's Disconnect
        assert states[other_id].disconnect_status_code == 1000  # the client's own close


async def test_a_killed_node_loses_its_connections_and_a_restarted_one_shows_only_its_new_ones(
    kafka_settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    node_id = unique("gw-node")
    async with (
        with_command_topics(kafka_settings) as settings,
        projector_and_api(settings, engine, lease_seconds=LEASE_SECONDS) as system,
    ):
        stub = system.stub
        first = GatewayProcess(settings, node_id, tmp_path / "first.log")
        try:
            await first.start()
            async with connect(first.url) as a, connect(first.url) as b:
                old = [own_id(a), own_id(b)]
                for cid in old:
                    await wait_for_get(stub, cid, "OK")
                first_incarnation = (await system.store.nodes())[node_id].incarnation
                # While the node lives (heartbeats every 0.2 s), its connections stay: still
                # there after more than a lease.
                await asyncio.sleep(LEASE_SECONDS * 1.5)
                for cid in old:
                    await wait_for_get(stub, cid, "OK", within=10)

                await first.kill()
                killed_at = time.monotonic()
                for cid in old:
                    await wait_for_get(stub, cid, "NOT_FOUND", lambda d: "node lost" in d)
                # Counted from the last heartbeat, which came shortly before the kill.
                assert time.monotonic() - killed_at >= LEASE_SECONDS / 2
                code, details = await get_status(stub, old[0])
                assert (code, details) == (
                    "NOT_FOUND",
                    f"connection {old[0]!r} not found (gone: node lost)",
                )
                lost = await status_of(stub.Send(send_request(old[0], b"x"), timeout=30))
                assert lost == ("NOT_FOUND", f"connection {old[0]!r} not found (gone: node lost)")
                with pytest.raises(ConnectionClosed):
                    await received(a)
        finally:
            await first.close()

        async with gateway_node(settings, node_id, tmp_path / "second.log") as second:
            async with connect(second.url) as c:
                new = own_id(c)
                await wait_for_get(stub, new, "OK")
                # The node's start travels on its own partition: wait until it is projected.
                for cid in old:
                    code, details = await wait_for_get(
                        stub, cid, "NOT_FOUND", lambda d: "node restarted" in d
                    )
                    assert details == f"connection {cid!r} not found (gone: node restarted)"
                    gone = await status_of(stub.Send(send_request(cid, b"x"), timeout=30))
                    assert gone == ("NOT_FOUND", details)
                second_incarnation = (await system.store.nodes())[node_id].incarnation
                assert second_incarnation > first_incarnation
                # The new start takes commands for its own connections.
                assert await status_of(stub.Send(send_request(new, b"again"), timeout=30)) == (
                    "OK",
                    "",
                )
                assert await received(c) == "again"
                # Still visible well past a lease while the node lives.
                await asyncio.sleep(LEASE_SECONDS * 1.5)
                await wait_for_get(stub, new, "OK", within=10)
            assert await second.terminate() == 0
            assert_clean(second)

        # The kill is history in the log only as silence: the old connections are still open
        # in the read model, which is the fold of the log.
        result = await verified(settings, engine, system.store)
        assert result.ok, (result.differences, result.node_differences)
        states = await system.store.all_states()
        assert all(states[cid].disconnected_at_ns is None for cid in old)
        assert states[new].disconnected_at_ns is not None
        assert (await system.store.nodes())[node_id].incarnation == second_incarnation
