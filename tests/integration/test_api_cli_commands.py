"""`conntrack-api send` and `conntrack-api disconnect` as an operator (or the demo) runs them,
against a served API on the real broker whose gateway node is played by the test: the command
reaches the node as the frame / close asked for, `{}` and exit 0 on the node's DONE, and the
project's exit codes otherwise (1 for NOT_FOUND, 69 for an unreachable server, 2 for bad
input), each with one line on stderr."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.application.commands import CommandChannel
from conntrack.api.read.repository import ConnectionRepository
from conntrack.api.transport.server import ApiServer
from conntrack.core.commands import (
    CloseSocket,
    Command,
    DataType,
    Outcome,
    OutcomeStatus,
    SendFrame,
    decode_command,
    encode_outcome,
)
from conntrack.core.fold import ConnectionState, NodeState
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from tests.support.kafka import create_topic, delete_topics, unique
from tests.support.ports import free_port

pytestmark = [pytest.mark.kafka, pytest.mark.parametrize("backend", ["sqlite"])]

API = str(Path(sys.executable).parent / "conntrack-api")


async def play_node(settings: Settings, commands: str, outcomes: str, got: list[Command]) -> None:
    """The gateway node: records every command and answers DONE."""
    consumer = AIOKafkaConsumer(
        commands, bootstrap_servers=settings.kafka_bootstrap_servers, auto_offset_reset="earliest"
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    await producer.start()
    try:
        async for record in consumer:
            command = decode_command(record.value, record.key)
            got.append(command)
            outcome = Outcome(
                command.command_id,
                command.node_id,
                command.node_incarnation,
                time.time_ns(),
                OutcomeStatus.DONE,
            )
            await producer.send_and_wait(
                outcomes, encode_outcome(outcome), key=command.reply_to.encode()
            )
    finally:
        await consumer.stop()
        await producer.stop()


@contextlib.asynccontextmanager
async def served(
    kafka_settings: Settings, engine: AsyncEngine
) -> AsyncIterator[tuple[str, list[Command]]]:
    """An API on a free port whose read model holds one open connection, "on-node", on node n1;
    yields its address and the commands the node received."""
    s = kafka_settings
    commands, outcomes = unique("commands"), unique("outcomes")
    await create_topic(s.kafka_bootstrap_servers, commands, 3)
    await create_topic(s.kafka_bootstrap_servers, outcomes, 3)
    store = ProjectionStore(engine)
    await store.positions(s.events_topic, [0])
    now = time.time_ns()  # the node was heard from just now, well inside the lease
    state = ConnectionState(
        "on-node",
        gateway_id="gw",
        source_ip="10.0.0.1",
        user_agent="ua",
        connected_at_ns=now - 10**9,
        connected_event_id="c-on-node",
        last_active_at_ns=now - 10**9,
        node_id="n1",
        node_incarnation=5,
    )
    await store.apply_batch(
        s.events_topic,
        {0: (0, 1)},
        {"on-node": state},
        {"n1": NodeState("n1", 5, now - 10**10, now, "gw")},
    )
    got: list[Command] = []
    playing = asyncio.create_task(play_node(s, commands, outcomes, got))
    channel = CommandChannel(s.kafka_bootstrap_servers, commands, outcomes)
    try:
        async with ApiServer(
            ConnectionRepository(engine), "127.0.0.1:0", commands=channel
        ) as server:
            for _ in range(300):
                if channel.ready:
                    break
                await asyncio.sleep(0.05)
            assert channel.ready
            yield f"127.0.0.1:{server.port}", got
    finally:
        playing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await playing
        await delete_topics(s.kafka_bootstrap_servers, [commands, outcomes])


async def api(*args: str) -> tuple[int, str, str]:
    """conntrack-api ARGS in a clean environment (no CONNTRACK_* of the caller's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")}
    proc = await asyncio.create_subprocess_exec(
        API, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line(err: str, *words: str) -> None:
    text = err.strip()
    assert "Traceback" not in text, text
    assert text.count("\n") == 0, text
    for word in words:
        assert word in text, text


async def test_send_and_disconnect_subcommands(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    async with served(kafka_settings, engine) as (target, got):
        code, out, err = await api("send", "on-node", "--text", "héllo", "--target", target)
        assert (code, out.strip()) == (0, "{}"), err
        # --binary takes base64; flags may come before the subcommand's argument too.
        code, out, _ = await api("send", "--target", target, "--binary", "AP8B", "on-node")
        assert (code, out.strip()) == (0, "{}")
        code, out, _ = await api("disconnect", "on-node", "--target", target)
        assert (code, out.strip()) == (0, "{}")
        assert [c.action for c in got] == [
            SendFrame("héllo".encode(), DataType.TEXT),
            SendFrame(b"\x00\xff\x01", DataType.BINARY),
            CloseSocket(),
        ]
        assert {(c.node_id, c.node_incarnation, c.connection_id) for c in got} == {
            ("n1", 5, "on-node")
        }

        # A negative answer: 1, the status on stderr, nothing sent.
        code, out, err = await api("send", "never-seen", "--text", "x", "--target", target)
        assert (code, out) == (1, "")
        one_line(err, "NOT_FOUND")
        code, _, err = await api("disconnect", "never-seen", "--target", target)
        assert code == 1
        one_line(err, "NOT_FOUND")
        # Refused by the API's validation (data is required): 1, INVALID_ARGUMENT.
        code, _, err = await api("send", "on-node", "--binary", "", "--target", target)
        assert code == 1
        one_line(err, "INVALID_ARGUMENT")
        assert len(got) == 3

    # Usage: not base64, or neither --text nor --binary: 2.
    code, _, err = await api("send", "on-node", "--binary", "not base64!")
    assert code == 2
    one_line(err, "conntrack-api: --binary", "base64")
    code, _, err = await api("send", "on-node")
    assert code == 2
    assert "--text" in err
    # No server there: 69.
    nobody = f"127.0.0.1:{free_port()}"
    for args in (("send", "on-node", "--text", "x"), ("disconnect", "on-node")):
        code, _, err = await api(*args, "--target", nobody, "--timeout", "2")
        assert code == 69, err
        one_line(err, "UNAVAILABLE")
