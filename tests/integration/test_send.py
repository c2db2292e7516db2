"""Send and Disconnect through the command channel, on the real broker, once per read-model
backend. The gateway node is played by the test (it reads the commands topic and answers on the
outcomes topic as docs/producer.md describes), so each outcome the API maps can be chosen."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.application.commands import CommandChannel
from conntrack.api.read.repository import ConnectionRepository
from conntrack.api.transport.server import ApiServer
from conntrack.core.commands import (
    CloseSocket,
    DataType,
    OutcomeStatus,
    SendFrame,
)
from conntrack.core.fold import NodeState
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from tests.support.kafka import create_topic, delete_topics, unique
from tests.support.node import PlayedNode, open_state

pytestmark = [pytest.mark.kafka]


@contextlib.asynccontextmanager
async def serving(
    kafka_settings: Settings, engine: AsyncEngine
) -> AsyncIterator[tuple[svc_grpc.ConnectionServiceStub, PlayedNode]]:
    s = kafka_settings
    commands, outcomes = unique("commands"), unique("outcomes")
    await create_topic(s.kafka_bootstrap_servers, commands, 3)
    await create_topic(s.kafka_bootstrap_servers, outcomes, 3)
    store = ProjectionStore(engine)
    await store.positions(s.events_topic, [0])
    # The node was heard from just now: the test runs well inside the lease.
    now = time.time_ns()
    await store.apply_batch(
        s.events_topic,
        {0: (0, 1)},
        {
            "on-node": open_state("on-node", "n1", 5, now),
            "old-start": open_state("old-start", "n1", 4, now),
            "plain": open_state("plain", None, None, now),
            "closed": open_state("closed", "n1", 5, now)._replace(
                disconnected_at_ns=now, disconnected_event_id="d", disconnect_status_code=1000
            ),
        },
        {"n1": NodeState("n1", 5, now - 10**10, now, "gw")},
    )
    node = PlayedNode(s, commands, outcomes)
    playing = asyncio.create_task(node.run())
    channel = CommandChannel(s.kafka_bootstrap_servers, commands, outcomes)
    try:
        async with (
            ApiServer(
                ConnectionRepository(engine),
                "127.0.0.1:0",
                commands=channel,
                command_timeout_seconds=2.0,
            ) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as grpc_channel,
        ):
            for _ in range(300):
                if channel.ready:
                    break
                await asyncio.sleep(0.05)
            assert channel.ready
            yield svc_grpc.ConnectionServiceStub(grpc_channel), node
    finally:
        playing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await playing
        await delete_topics(s.kafka_bootstrap_servers, [commands, outcomes])


async def code_of(call: object) -> tuple[str, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


def send(cid: str, data: bytes, kind: int = svc.SendToConnectionRequest.TEXT) -> object:
    return svc.SendToConnectionRequest(connection_id=cid, data=data, type=kind)  # type: ignore[arg-type]


async def test_send_and_disconnect_reach_the_node_and_answer_by_its_outcome(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    async with serving(kafka_settings, engine) as (stub, node):
        largest = ("ж" * 65536).encode()  # 131072 bytes of valid UTF-8
        assert len(largest) == 131072
        assert await code_of(stub.Send(send("on-node", largest), timeout=10)) == ("OK", "")
        binary = bytes(range(256)) * 4
        ok = await code_of(
            stub.Send(send("on-node", binary, svc.SendToConnectionRequest.BINARY), timeout=10)
        )
        assert ok == ("OK", "")
        assert await code_of(
            stub.Disconnect(svc.DisconnectRequest(connection_id="on-node"), timeout=10)
        ) == ("OK", "")
        (key1, first), (key2, second), (key3, third) = node.received
        assert (key1, key2, key3) == (b"n1", b"n1", b"n1")
        assert first.action == SendFrame(largest, DataType.TEXT)
        assert second.action == SendFrame(binary, DataType.BINARY)
        assert third.action == CloseSocket()
        assert (first.node_id, first.node_incarnation, first.connection_id) == ("n1", 5, "on-node")
        assert len({c.command_id for _, c in node.received}) == 3
        assert first.expires_at_ns > first.issued_at_ns

        # Refused before anything is sent.
        too_long = await code_of(stub.Send(send("on-node", b"x" * 131073), timeout=10))
        assert too_long[0] == "INVALID_ARGUMENT"
        assert "at most 131072 bytes" in too_long[1]
        for bad in (
            send("on-node", b"\xff\xfe"),  # TEXT must be UTF-8
            send("on-node", b""),  # data is required
            send("on-node", b"x", svc.SendToConnectionRequest.DATA_TYPE_UNSPECIFIED),
            send("", b"x"),
            send("x" * 51, b"x"),
        ):
            assert (await code_of(stub.Send(bad, timeout=10)))[0] == "INVALID_ARGUMENT"
        # Unknown, closed, and of an older start of the node: NOT_FOUND, nothing sent.
        for cid in ("never-seen", "closed", "old-start"):
            assert (await code_of(stub.Send(send(cid, b"x"), timeout=10)))[0] == "NOT_FOUND"
            assert (await code_of(stub.Disconnect(svc.DisconnectRequest(connection_id=cid))))[
                0
            ] == "NOT_FOUND"
        # A gateway without the node role cannot take commands.
        assert (await code_of(stub.Send(send("plain", b"x"), timeout=10)))[0] == (
            "FAILED_PRECONDITION"
        )
        assert len(node.received) == 3

        # The node no longer holds the socket: NOT_FOUND; no outcome in time: UNAVAILABLE.
        node.answers["on-node"] = OutcomeStatus.CONNECTION_GONE
        gone = await code_of(stub.Send(send("on-node", b"x"), timeout=10))
        assert gone[0] == "NOT_FOUND", gone
        assert "no longer holds it" in gone[1]
        node.silent.add("on-node")
        slow = await code_of(stub.Send(send("on-node", b"x"), timeout=10))
        assert slow[0] == "UNAVAILABLE", slow
        assert "no outcome from gateway node n1" in slow[1]
        # A caller's deadline shorter than the command timeout: answered before it passes.
        started = asyncio.get_running_loop().time()
        short = await code_of(stub.Send(send("on-node", b"x"), timeout=1.5))
        assert short[0] == "UNAVAILABLE", short
        assert asyncio.get_running_loop().time() - started < 1.5
