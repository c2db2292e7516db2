"""Broadcast end to end: two `conntrack-gateway` nodes (subprocesses) of one gateway holding real
WebSocket clients, the projector folding their events, the API (gRPC and REST) paging the
directory and fanning the message out through the command channel on the real broker. Every
client addressed gets the frame exactly once, a filtered broadcast reaches only its clients, the
counts are right, a command delivered twice is executed once, bad input is INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection, connect

from conntrack.api.application.commands import CommandChannel
from conntrack.api.application.freshness import POSITION_HEADER
from conntrack.api.read.repository import ConnectionRepository
from conntrack.api.transport.server import ApiServer
from conntrack.core.commands import (
    BroadcastFrame,
    Command,
    DataType,
    Outcome,
    OutcomeStatus,
    decode_outcome,
    encode_command,
)
from conntrack.core.fold import NodeState
from conntrack.core.liveness import Liveness
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2 as pb
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2_grpc as pb_grpc
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.core.timeutil import to_timestamp
from conntrack.projector.runner import Projector
from tests.support.gateway import (
    GatewayProcess,
    gateway_node,
    own_id,
    with_command_topics,
)
from tests.support.kafka import unique
from tests.support.ports import free_port
from tests.support.projector import running
from tests.support.readmodel import ReadModel, opened

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

TEXT = pb.BroadcastRequest.TEXT
BINARY = pb.BroadcastRequest.BINARY


@contextlib.asynccontextmanager
async def api(settings: Settings, engine: AsyncEngine) -> AsyncIterator[ApiServer]:
    channel = CommandChannel(
        settings.kafka_bootstrap_servers, settings.commands_topic, settings.command_outcomes_topic
    )
    async with (
        running(Projector(settings, ProjectionStore(engine))),
        ApiServer(
            ConnectionRepository(engine),
            "127.0.0.1:0",
            freshness_ttl_seconds=0,
            liveness=Liveness.of_seconds(30.0),
            commands=channel,
            command_timeout_seconds=20,
            rest_port=0,
        ) as server,
    ):
        deadline = asyncio.get_running_loop().time() + 60
        while not channel.ready:
            assert asyncio.get_running_loop().time() < deadline, "command channel not ready"
            await asyncio.sleep(0.05)
        yield server


async def nothing_more(clients: list[ClientConnection], within: float = 1.5) -> None:
    """No client receives another frame within `within` seconds."""
    for client in clients:
        try:
            extra = await asyncio.wait_for(client.recv(), within)
        except TimeoutError:
            continue
        raise AssertionError(f"an extra frame: {extra!r}")


async def each_receives(clients: list[ClientConnection], frame: str | bytes) -> None:
    for client in clients:
        assert await asyncio.wait_for(client.recv(), 30) == frame


def assert_clean(*gateways: GatewayProcess) -> None:
    for gateway in gateways:
        log = gateway.log()
        assert "Traceback" not in log, log
        assert " ERROR " not in log, log


async def test_broadcast_reaches_each_client_of_the_gateway_once_and_filters_hold(
    kafka_settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    node_a, node_b = unique("gw-a"), unique("gw-b")
    async with (
        with_command_topics(kafka_settings) as settings,
        api(settings, engine) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        aiohttp.ClientSession() as http,
        gateway_node(settings, node_a, tmp_path / "a.log") as gateway_a,
        gateway_node(settings, node_b, tmp_path / "b.log") as gateway_b,
        contextlib.AsyncExitStack() as stack,
    ):
        stub = pb_grpc.ConnectionDirectoryServiceStub(channel)
        gateway_id = settings.gateway_id
        on_a = [await stack.enter_async_context(connect(gateway_a.url)) for _ in range(3)]
        on_b = [await stack.enter_async_context(connect(gateway_b.url)) for _ in range(2)]

        async def open_count(**filters: Any) -> int:
            answer = await stub.CountConnections(
                pb.CountConnectionsRequest(
                    gateway_id=gateway_id, filter=pb.ConnectionFilter(**filters)
                ),
                timeout=30,
            )
            return int(answer.count)

        async def until_open(count: int, **filters: Any) -> None:
            deadline = asyncio.get_running_loop().time() + 60
            while await open_count(**filters) != count:
                assert asyncio.get_running_loop().time() < deadline, "not projected in time"
                await asyncio.sleep(0.05)

        await until_open(5)

        # Everyone, once: gRPC.
        call = stub.Broadcast(
            pb.BroadcastRequest(gateway_id=gateway_id, data="всем ✓".encode(), type=TEXT),
            timeout=60,
        )
        answer = await call
        assert (answer.addressed, answer.delivered, answer.complete) == (5, 5, True)
        assert answer.unreachable == 0
        assert len(answer.broadcast_id) == 32
        assert POSITION_HEADER in dict(await call.trailing_metadata())
        await each_receives(on_a + on_b, "всем ✓")

        # Only node B's, over REST, BINARY.
        data = bytes(range(256)) * 512  # 131072 bytes, upstream's limit
        url = f"http://127.0.0.1:{server.rest_port}/conntrack/directory/v1/gateways/"
        async with http.post(
            f"{url}{gateway_id}/connections:broadcast",
            json={
                "filter": {"nodeId": node_b},
                "data": base64.b64encode(data).decode(),
                "type": "BINARY",
            },
        ) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
            assert POSITION_HEADER in response.headers
        assert (body["addressed"], body["delivered"], body["complete"]) == ("2", "2", True)
        await each_receives(on_b, data)

        # Only those connected after a moment: a new client on A.
        moment = time.time_ns()
        late = await stack.enter_async_context(connect(gateway_a.url))
        await until_open(6)
        answer = await stub.Broadcast(
            pb.BroadcastRequest(
                gateway_id=gateway_id,
                filter=pb.ConnectionFilter(connected_after=to_timestamp(moment)),
                data=b"late",
                type=BINARY,
            ),
            timeout=60,
        )
        assert (answer.addressed, answer.delivered, answer.complete) == (1, 1, True)
        await each_receives([late], b"late")

        # Nobody matches: nothing sent, complete.
        answer = await stub.Broadcast(
            pb.BroadcastRequest(
                gateway_id=gateway_id,
                filter=pb.ConnectionFilter(node_id="no-such-node"),
                data=b"x",
                type=BINARY,
            ),
            timeout=60,
        )
        assert (answer.addressed, answer.delivered, answer.complete) == (0, 0, True)

        # Exactly once: no client got anything more than the above.
        await nothing_more(on_a + on_b + [late])

        # Bad input: INVALID_ARGUMENT, nothing sent.
        for request, why in (
            (pb.BroadcastRequest(gateway_id=gateway_id, type=TEXT), "data is required"),
            (
                pb.BroadcastRequest(gateway_id=gateway_id, data=b"x" * 131_073, type=BINARY),
                "at most 131072 bytes",
            ),
            (pb.BroadcastRequest(gateway_id=gateway_id, data=b"x"), "BINARY or TEXT"),
            (pb.BroadcastRequest(gateway_id=gateway_id, data=b"\xff", type=TEXT), "UTF-8"),
            (pb.BroadcastRequest(data=b"x", type=TEXT), "gateway_id is required"),
            (
                pb.BroadcastRequest(
                    gateway_id=gateway_id,
                    filter=pb.ConnectionFilter(node_id="n" * 256),
                    data=b"x",
                    type=TEXT,
                ),
                "filter.node_id",
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Broadcast(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert why in (err.value.details() or ""), err.value
        async with http.post(
            f"{url}{gateway_id}/connections:broadcast", json={"data": "", "type": "TEXT"}
        ) as response:
            assert response.status == 400
            assert (await response.json())["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        await nothing_more(on_a + on_b + [late], within=0.5)

        assert await gateway_a.terminate() == 0
        assert await gateway_b.terminate() == 0
        assert_clean(gateway_a, gateway_b)


async def test_a_broadcast_command_delivered_twice_is_executed_once(
    kafka_settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    """The same broadcast command (one command id) on the commands topic twice: the node
    writes the frame once and answers both with the same outcome; an id it does not hold is
    counted as gone."""
    node_id = unique("gw-node")
    async with (
        with_command_topics(kafka_settings) as settings,
        api(settings, engine) as server,
        gateway_node(settings, node_id, tmp_path / "gateway.log") as gateway,
        connect(gateway.url) as client,
        connect(gateway.url) as other,
    ):
        assert server.port is not None
        repository = ConnectionRepository(engine)
        deadline = asyncio.get_running_loop().time() + 60
        try:
            while (view := await repository.get_open(own_id(client))) is None:
                assert asyncio.get_running_loop().time() < deadline, "not projected in time"
                await asyncio.sleep(0.05)
        finally:
            await repository.release_connections()
        assert view.node_incarnation
        reply_to = f"test-{uuid.uuid4().hex}"
        now = time.time_ns()
        command = Command(
            command_id=uuid.uuid4().hex,
            node_id=node_id,
            node_incarnation=view.node_incarnation,
            connection_id="",
            issued_at_ns=now,
            expires_at_ns=now + 60 * 10**9,
            reply_to=reply_to,
            action=BroadcastFrame(b"once", DataType.BINARY, (own_id(client), "not-held-here")),
        )
        bootstrap = settings.kafka_bootstrap_servers
        consumer = AIOKafkaConsumer(
            settings.command_outcomes_topic,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
        )
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await consumer.start()
        await producer.start()
        try:
            for _ in range(2):
                await producer.send_and_wait(
                    settings.commands_topic, encode_command(command), key=node_id.encode()
                )
            outcomes: list[Outcome] = []
            async with asyncio.timeout(60):
                while len(outcomes) < 2:
                    async for record in consumer:
                        if record.key == reply_to.encode():
                            outcomes.append(decode_outcome(record.value))
                            break
        finally:
            await producer.stop()
            await consumer.stop()
        assert outcomes[0] == outcomes[1]
        first = outcomes[0]
        assert (first.status, first.delivered, first.gone) == (OutcomeStatus.DONE, 1, 1)
        assert first.command_id == command.command_id
        assert await asyncio.wait_for(client.recv(), 30) == b"once"
        await nothing_more([client, other])
        assert await gateway.terminate() == 0
        assert "Traceback" not in gateway.log()


async def test_counts_when_a_node_does_not_answer_and_unavailable_when_nothing_is_sent(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    """A connection whose node (alive by its heartbeats) runs no command receiver: addressed but
    not delivered, and the answer is not complete; one of a gateway without the node role is
    unreachable. With a command channel that cannot reach its topics nothing is handed to the
    broker: UNAVAILABLE (retrying is safe)."""
    now = time.time_ns()
    states = [
        opened("silent-1", "gw-x", now, node="silent", incarnation=3),
        opened("plain-1", "gw-x", now),
    ]
    await ReadModel(engine).apply(states, [NodeState("silent", 3, now - 10**9, now, "gw-x")])
    async with with_command_topics(kafka_settings) as settings, api(settings, engine) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ConnectionDirectoryServiceStub(channel)
            answer = await stub.Broadcast(
                pb.BroadcastRequest(gateway_id="gw-x", data=b"x", type=BINARY), timeout=3
            )
        assert (answer.addressed, answer.delivered, answer.complete) == (1, 0, False)
        assert answer.unreachable == 1
    # A broker nobody listens on (a cancelled retry against the real broker could leave a
    # connection for the garbage collector).
    cut_off = CommandChannel(f"127.0.0.1:{free_port()}", unique("none"), unique("none"))
    async with (
        ApiServer(ConnectionRepository(engine), "127.0.0.1:0", commands=cut_off) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.ConnectionDirectoryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Broadcast(
                pb.BroadcastRequest(gateway_id="gw-x", data=b"x", type=BINARY), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert "not connected to Kafka" in (err.value.details() or "")
