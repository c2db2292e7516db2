"""The node's command receiver on the real broker: commands published as the API does (encoded,
keyed by node id), outcomes read back from the outcomes topic (keyed by reply_to)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

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
from conntrack.producer.commands import NodeCommands, partition_for_node
from tests.support.kafka import create_topic, delete_topics, publish, unique

pytestmark = [pytest.mark.kafka]

SECOND = 1_000_000_000


@dataclass
class Topics:
    bootstrap: str
    commands: str
    outcomes: str


@pytest.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[Topics]:
    commands, outcomes = unique("commands"), unique("outcomes")
    await create_topic(kafka_bootstrap, commands, 3)
    await create_topic(kafka_bootstrap, outcomes, 2)
    yield Topics(kafka_bootstrap, commands, outcomes)
    await delete_topics(kafka_bootstrap, [commands, outcomes])


class Sockets:
    """The gateway's side: the sockets it holds, and every call the receiver made."""

    def __init__(self, *held: str) -> None:
        self.held = set(held)
        self.calls: list[tuple[Any, ...]] = []

    async def send(self, connection_id: str, data: bytes, data_type: DataType, /) -> bool:
        self.calls.append(("send", connection_id, data, data_type))
        return connection_id in self.held

    async def disconnect(self, connection_id: str, status_code: int, reason: str, /) -> bool:
        self.calls.append(("disconnect", connection_id, status_code, reason))
        if connection_id not in self.held:
            return False
        self.held.discard(connection_id)
        return True


def command(
    node: str,
    incarnation: int,
    connection_id: str,
    action: SendFrame | CloseSocket,
    *,
    reply_to: str,
    expires_in_s: float = 30.0,
    command_id: str | None = None,
) -> Command:
    now = time.time_ns()
    return Command(
        command_id or uuid.uuid4().hex,
        node,
        incarnation,
        connection_id,
        now,
        now + int(expires_in_s * SECOND),
        reply_to,
        action,
    )


async def send_commands(topics: Topics, *commands: Command) -> None:
    await publish(
        topics.bootstrap,
        topics.commands,
        [(c.node_id.encode(), encode_command(c), []) for c in commands],
    )


async def read_outcomes(
    topics: Topics, reply_to: str, n: int, quiet_s: float = 1.0
) -> list[Outcome]:
    """The outcomes keyed by reply_to: wait for n, then make sure no more come for quiet_s."""
    consumer = AIOKafkaConsumer(
        topics.outcomes, bootstrap_servers=topics.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[Outcome] = []
    try:
        async with asyncio.timeout(30):
            while len(out) < n:
                for records in (await consumer.getmany(timeout_ms=300)).values():
                    out += [decode_outcome(r.value) for r in records if r.key == reply_to.encode()]
        extra = await consumer.getmany(timeout_ms=int(quiet_s * 1000))
        out += [
            decode_outcome(r.value)
            for records in extra.values()
            for r in records
            if r.key == reply_to.encode()
        ]
    finally:
        await consumer.stop()
    return out


def receiver(topics: Topics, node: str, incarnation: int, sockets: Sockets) -> NodeCommands:
    return NodeCommands(
        topics.bootstrap,
        node,
        incarnation,
        sockets,
        commands_topic=topics.commands,
        outcomes_topic=topics.outcomes,
    )


async def test_each_command_gets_its_outcome(topics: Topics) -> None:
    node = unique("node")
    incarnation = time.time_ns()
    sockets = Sockets("held-1", "held-2")
    reply_to = unique("api")
    data = bytes(range(256)) * 512  # 131072 bytes: upstream's largest Send
    async with receiver(topics, node, incarnation, sockets) as commands:
        assert commands.partition == partition_for_node(node, 3)
        send_held = command(
            node, incarnation, "held-1", SendFrame(data, DataType.BINARY), reply_to=reply_to
        )
        send_text = command(
            node, incarnation, "held-1", SendFrame(b"hi \xc3\xa9", DataType.TEXT), reply_to=reply_to
        )
        send_unknown = command(
            node, incarnation, "nobody", SendFrame(b"x", DataType.TEXT), reply_to=reply_to
        )
        old_start = command(
            node, incarnation - 1, "held-1", SendFrame(b"x", DataType.TEXT), reply_to=reply_to
        )
        expired = command(
            node,
            incarnation,
            "held-1",
            SendFrame(b"late", DataType.TEXT),
            reply_to=reply_to,
            expires_in_s=-1,
        )
        close = command(node, incarnation, "held-2", CloseSocket(4000, "bye"), reply_to=reply_to)
        close_again = command(node, incarnation, "held-2", CloseSocket(), reply_to=reply_to)
        other_node = command(
            unique("other"),
            incarnation,
            "held-1",
            SendFrame(b"no", DataType.TEXT),
            reply_to=reply_to,
        )
        await send_commands(
            topics, send_held, send_text, send_unknown, old_start, expired, close, close_again
        )
        await publish(
            topics.bootstrap, topics.commands, [(node.encode(), encode_command(other_node), [])]
        )
        outcomes = {o.command_id: o for o in await read_outcomes(topics, reply_to, 7)}
    assert {cid: o.status for cid, o in outcomes.items()} == {
        send_held.command_id: OutcomeStatus.DONE,
        send_text.command_id: OutcomeStatus.DONE,
        send_unknown.command_id: OutcomeStatus.CONNECTION_GONE,
        old_start.command_id: OutcomeStatus.CONNECTION_GONE,
        expired.command_id: OutcomeStatus.EXPIRED,
        close.command_id: OutcomeStatus.DONE,
        close_again.command_id: OutcomeStatus.CONNECTION_GONE,
    }
    assert all(o.node_id == node and o.node_incarnation == incarnation for o in outcomes.values())
    assert all(o.completed_at_ns >= send_held.issued_at_ns for o in outcomes.values())
    # The handler saw the exact bytes, in the partition's order; no call for the old start, the
    # expired command or the record of another node's id under this node's key.
    assert sockets.calls == [
        ("send", "held-1", data, DataType.BINARY),
        ("send", "held-1", b"hi \xc3\xa9", DataType.TEXT),
        ("send", "nobody", b"x", DataType.TEXT),
        ("disconnect", "held-2", 4000, "bye"),
        ("disconnect", "held-2", 1000, ""),
    ]
    stats = commands.stats()
    assert (stats.executed, stats.invalid) == (5, 1)  # the mismatched key is not a command


async def test_a_command_delivered_twice_acts_once(topics: Topics) -> None:
    node, incarnation = unique("node"), time.time_ns()
    sockets = Sockets("held")
    reply_to = unique("api")
    twice = command(node, incarnation, "held", SendFrame(b"once", DataType.TEXT), reply_to=reply_to)
    async with receiver(topics, node, incarnation, sockets) as commands:
        await send_commands(topics, twice, twice)
        outcomes = await read_outcomes(topics, reply_to, 2)
    assert sockets.calls == [("send", "held", b"once", DataType.TEXT)]
    # The second delivery is answered with the remembered outcome, not executed.
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].status is OutcomeStatus.DONE
    assert commands.stats().duplicates == 1


async def test_a_restarted_node_goes_on_after_the_last_command_it_finished(
    topics: Topics,
) -> None:
    node = unique("node")
    first, second = time.time_ns(), time.time_ns() + 1
    reply_to = unique("api")
    sockets = Sockets("held")
    done = command(node, first, "held", SendFrame(b"one", DataType.TEXT), reply_to=reply_to)
    async with receiver(topics, node, first, sockets):
        await send_commands(topics, done)
        assert [o.status for o in await read_outcomes(topics, reply_to, 1, quiet_s=0)] == [
            OutcomeStatus.DONE
        ]
    # Sent while the node is down: read by its next start, which answers for the old start.
    while_down = command(node, first, "held", SendFrame(b"two", DataType.TEXT), reply_to=reply_to)
    await send_commands(topics, while_down)
    fresh = Sockets("held")
    async with receiver(topics, node, second, fresh):
        outcomes = await read_outcomes(topics, reply_to, 2)
    assert [(o.command_id, o.status) for o in outcomes] == [
        (done.command_id, OutcomeStatus.DONE),
        (while_down.command_id, OutcomeStatus.CONNECTION_GONE),
    ]
    assert outcomes[1].node_incarnation == second
    assert fresh.calls == []  # the finished command was not read again


async def test_start_and_stop_are_idempotent_and_a_command_in_progress_finishes(
    topics: Topics,
) -> None:
    node, incarnation = unique("node"), time.time_ns()
    reply_to = unique("api")
    started = asyncio.Event()

    class Slow(Sockets):
        async def send(self, connection_id: str, data: bytes, data_type: DataType, /) -> bool:
            started.set()
            await asyncio.sleep(1.0)
            return await super().send(connection_id, data, data_type)

    sockets = Slow("held")
    commands = receiver(topics, node, incarnation, sockets)
    await asyncio.gather(commands.start(), commands.start())
    assert commands.started
    slow = command(node, incarnation, "held", SendFrame(b"slow", DataType.TEXT), reply_to=reply_to)
    await send_commands(topics, slow)
    await asyncio.wait_for(started.wait(), 30)
    await asyncio.gather(commands.stop(), commands.stop())
    assert not commands.started
    assert sockets.calls == [("send", "held", b"slow", DataType.TEXT)]
    outcomes = await read_outcomes(topics, reply_to, 1, quiet_s=0)
    assert [o.status for o in outcomes] == [OutcomeStatus.DONE]
    await commands.stop()


async def test_a_running_node_commits_what_it_finished_without_a_commit_per_command(
    topics: Topics,
) -> None:
    """Commits are spaced (at most one per 100 ms) but still made while the node runs, not only
    at stop(): the group's offset reaches the last finished command within a few seconds."""
    node, incarnation = unique("node"), time.time_ns()
    reply_to = unique("api")
    sockets = Sockets("held")
    async with receiver(topics, node, incarnation, sockets) as commands:
        for i in range(30):  # one at a time, so each is a poll (and a settled batch) of its own
            await send_commands(
                topics,
                command(
                    node,
                    incarnation,
                    "held",
                    SendFrame(b"%d" % i, DataType.TEXT),
                    reply_to=reply_to,
                ),
            )
            await asyncio.sleep(0.01)
        assert len(await read_outcomes(topics, reply_to, 30, quiet_s=0)) == 30
        assert commands.partition is not None
        tp = TopicPartition(topics.commands, commands.partition)
        group = AIOKafkaConsumer(
            bootstrap_servers=topics.bootstrap,
            group_id=f"conntrack-node.{node}",
            enable_auto_commit=False,
        )
        await group.start()
        try:
            group.assign([tp])
            end = (await group.end_offsets([tp]))[tp]
            # A few seconds: a commit on a busy broker takes far longer than the 100 ms spacing.
            async with asyncio.timeout(3.0):
                while True:
                    committed = await group.committed(tp)
                    if committed == end:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await group.stop()
        assert commands.started  # committed while running, not by stop()
    assert len(sockets.calls) == 30
