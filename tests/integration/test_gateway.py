"""conntrack-gateway as an operator runs it, on the real broker, with real WebSocket clients:
events of its sockets in the events topic, the API's commands (published here as the API does)
written to and closing its sockets, SIGTERM closing everything with 1001."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiokafka import AIOKafkaConsumer
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from conntrack.core.commands import (
    CloseSocket,
    Command,
    DataType,
    Outcome,
    OutcomeStatus,
    SendFrame,
    decode_outcome,
    encode_command,
)
from conntrack.core.events import (
    Activity,
    Cause,
    Connected,
    Disconnected,
    Event,
    NodeStarted,
)
from conntrack.core.settings import Settings
from conntrack.gateway.server import CONNECTION_ID_HEADER
from tests.support.kafka import create_topic, delete_topics, publish, read_events, unique
from tests.support.ports import free_port

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SECOND = 1_000_000_000
USER_AGENT = "gateway-test/1.0"


@dataclass
class Running:
    settings: Settings
    process: asyncio.subprocess.Process
    url: str
    node_id: str


@pytest.fixture
async def gateway(kafka_settings: Settings) -> AsyncIterator[Running]:
    bootstrap = kafka_settings.kafka_bootstrap_servers
    commands, outcomes = unique("commands"), unique("outcomes")
    await create_topic(bootstrap, commands, 3)
    await create_topic(bootstrap, outcomes, 1)
    settings = kafka_settings.model_copy(
        update={"commands_topic": commands, "command_outcomes_topic": outcomes}
    )
    node_id, port = unique("gw-node"), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conntrack.gateway",
        "--gateway-node-id",
        node_id,
        "--gateway-listen",
        f"127.0.0.1:{port}",
        env={
            **os.environ,
            "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "CONNTRACK_EVENTS_TOPIC": settings.events_topic,
            "CONNTRACK_COMMANDS_TOPIC": commands,
            "CONNTRACK_COMMAND_OUTCOMES_TOPIC": outcomes,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert line.startswith(b"listening on ws://"), line
        url = line.split()[2].decode()
        yield Running(settings, process, url, node_id)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await delete_topics(bootstrap, [commands, outcomes])


async def events_of(settings: Settings, n: int, *, timeout_s: float = 30) -> list[Event]:
    """The events topic once it holds at least n events (node events included)."""
    deadline = time.monotonic() + timeout_s
    while True:
        events = await read_events(settings.kafka_bootstrap_servers, settings.events_topic)
        if len(events) >= n or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.2)


async def outcome_of(settings: Settings, reply_to: str, command_id: str) -> Outcome:
    consumer = AIOKafkaConsumer(
        settings.command_outcomes_topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while True:
                for records in (await consumer.getmany(timeout_ms=300)).values():
                    for record in records:
                        outcome = decode_outcome(record.value)
                        if record.key == reply_to.encode() and outcome.command_id == command_id:
                            return outcome
    finally:
        await consumer.stop()


async def command(
    running: Running, incarnation: int, connection_id: str, action: SendFrame | CloseSocket
) -> Outcome:
    now = time.time_ns()
    cmd = Command(
        uuid.uuid4().hex,
        running.node_id,
        incarnation,
        connection_id,
        now,
        now + 30 * SECOND,
        unique("api"),
        action,
    )
    await publish(
        running.settings.kafka_bootstrap_servers,
        running.settings.commands_topic,
        [(running.node_id.encode(), encode_command(cmd), [])],
    )
    return await outcome_of(running.settings, cmd.reply_to, cmd.command_id)


def own_id(client: ClientConnection) -> str:
    assert client.response is not None
    return client.response.headers[CONNECTION_ID_HEADER]


async def test_the_gateway_publishes_its_sockets_and_executes_commands(gateway: Running) -> None:
    settings = gateway.settings
    async with (
        connect(gateway.url, user_agent_header=USER_AGENT) as first,
        connect(gateway.url, user_agent_header=USER_AGENT) as second,
    ):
        first_id, second_id = own_id(first), own_id(second)
        for i in range(5):
            await first.send(f"hello {i}")

        events = await events_of(settings, 4)  # NodeStarted, 2 Connected, an Activity
        (started,) = [e for e in events if isinstance(e.payload, NodeStarted)]
        assert isinstance(started.payload, NodeStarted)
        assert started.payload.node_id == gateway.node_id
        incarnation = started.payload.incarnation
        connected = {e.connection_id: e.payload for e in events if e.kind == "connected"}
        assert set(connected) == {first_id, second_id}
        for payload in connected.values():
            assert isinstance(payload, Connected)
            assert (payload.source_ip, payload.user_agent) == ("127.0.0.1", USER_AGENT)
            assert (payload.node_id, payload.node_incarnation) == (gateway.node_id, incarnation)
        assert any(e.connection_id == first_id and isinstance(e.payload, Activity) for e in events)
        assert all(e.gateway_id == settings.gateway_id for e in events)

        # Send: TEXT and BINARY, upstream's largest (131072 bytes), byte for byte.
        text = ("é" * 65_536).encode()
        binary = os.urandom(131_072)
        sent_text = await command(gateway, incarnation, first_id, SendFrame(text, DataType.TEXT))
        assert sent_text.status is OutcomeStatus.DONE
        assert await asyncio.wait_for(first.recv(), 10) == text.decode()
        sent = await command(gateway, incarnation, first_id, SendFrame(binary, DataType.BINARY))
        assert sent.status is OutcomeStatus.DONE
        assert await asyncio.wait_for(first.recv(), 10) == binary
        assert (sent.node_id, sent.node_incarnation) == (gateway.node_id, incarnation)

        unknown = await command(gateway, incarnation, "nobody", SendFrame(b"x", DataType.TEXT))
        assert unknown.status is OutcomeStatus.CONNECTION_GONE

        # Disconnect closes the socket with the code; a Disconnected follows.
        closed = await command(gateway, incarnation, second_id, CloseSocket(4001, "bye"))
        assert closed.status is OutcomeStatus.DONE
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(second.recv(), 10)
        assert (second.close_code, second.close_reason) == (4001, "bye")
        gone = await command(gateway, incarnation, second_id, CloseSocket())
        assert gone.status is OutcomeStatus.CONNECTION_GONE

        events = await events_of(settings, len(events) + 1)
        (second_closed,) = [e for e in events if e.kind == "disconnected"]
        assert second_closed.connection_id == second_id
        # Closed by the API's Disconnect: the event says so, for the lifecycle stream.
        assert second_closed.payload == Disconnected(4001, "bye", Cause.DISCONNECTED_BY_API)

        # SIGTERM: the open socket is closed with 1001, its Disconnected published, exit 0.
        gateway.process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(first.recv(), 10)
        assert first.close_code == 1001
    assert await asyncio.wait_for(gateway.process.wait(), 30) == 0
    assert gateway.process.stderr is not None
    log = (await gateway.process.stderr.read()).decode()
    assert "Traceback" not in log
    assert " ERROR " not in log, log
    events = await events_of(settings, len(events) + 1)
    first_closed = [e for e in events if e.kind == "disconnected" and e.connection_id == first_id]
    assert [e.payload.status_code for e in first_closed] == [1001]  # type: ignore[union-attr]
