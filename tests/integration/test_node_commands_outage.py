"""The node's command receiver across broker restarts and its own restarts, on a private broker
this module stops and starts (the shared broker stays up for everyone else).

A command's effect must happen exactly once: the broker going away while commands are being
executed, and coming back, loses none and repeats none, and every command is answered on the
outcomes topic (an outcome may be published more than once; the API takes the first). A
restarted receiver is a new incarnation: the commands it reads for the previous one are answered
CONNECTION_GONE, not executed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

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
from conntrack.producer.commands import NodeCommands
from tests.conftest import PrivateBroker
from tests.support.kafka import create_topic, publish, unique

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SECOND = 1_000_000_000
EXPIRES_IN_S = 120.0


class Recording:
    """A gateway whose sockets all exist; every call is recorded with the command's data (the
    data names the command). Each call takes `delay_s`, so commands are still being executed
    when the broker goes away."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[tuple[Any, ...]] = []

    async def send(self, connection_id: str, data: bytes, data_type: DataType, /) -> bool:
        self.calls.append(("send", connection_id, data))
        await asyncio.sleep(self.delay_s)
        return True

    async def disconnect(self, connection_id: str, status_code: int, reason: str, /) -> bool:
        self.calls.append(("disconnect", connection_id, reason))
        await asyncio.sleep(self.delay_s)
        return True

    def executed(self) -> Counter[str]:
        """Calls by command id (a Send's data or a Disconnect's reason is its command id)."""
        return Counter(c[2].decode() if c[0] == "send" else c[2] for c in self.calls)


def make_commands(node: str, incarnation: int, reply_to: str, n: int) -> list[Command]:
    """n commands, every fifth a Disconnect, each naming itself in its data or reason."""
    out = []
    for i in range(n):
        command_id = uuid.uuid4().hex
        now = time.time_ns()
        action = (
            CloseSocket(4000, command_id)
            if i % 5 == 4
            else SendFrame(command_id.encode(), DataType.TEXT)
        )
        out.append(
            Command(
                command_id,
                node,
                incarnation,
                f"conn-{i}",
                now,
                now + int(EXPIRES_IN_S * SECOND),
                reply_to,
                action,
            )
        )
    return out


async def send_commands(bootstrap: str, topic: str, commands: list[Command]) -> None:
    await publish(bootstrap, topic, [(c.node_id.encode(), encode_command(c), []) for c in commands])


async def read_outcomes(
    bootstrap: str, topic: str, reply_to: str, command_ids: set[str], timeout_s: float = 60.0
) -> list[Outcome]:
    """Every outcome keyed by reply_to, once there is one for each of command_ids, and then
    whatever else comes within 2 s (duplicates)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    out: list[Outcome] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not command_ids <= {o.command_id for o in out}:
                for records in (await consumer.getmany(timeout_ms=300)).values():
                    out += [decode_outcome(r.value) for r in records if r.key == reply_to.encode()]
        extra = await consumer.getmany(timeout_ms=2000)
        out += [
            decode_outcome(r.value)
            for records in extra.values()
            for r in records
            if r.key == reply_to.encode()
        ]
    finally:
        await consumer.stop()
    return out


async def fresh_topics(bootstrap: str) -> tuple[str, str]:
    commands, outcomes = unique("commands"), unique("outcomes")
    await create_topic(bootstrap, commands, 3)
    await create_topic(bootstrap, outcomes, 2)
    return commands, outcomes


def receiver(
    bootstrap: str, topics: tuple[str, str], node: str, incarnation: int, handler: Recording
) -> NodeCommands:
    return NodeCommands(
        bootstrap,
        node,
        incarnation,
        handler,
        commands_topic=topics[0],
        outcomes_topic=topics[1],
    )


async def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def errors_from_this_project(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(("producer", "connection_tracker"))
    ]


async def test_a_broker_restart_while_commands_run_loses_and_repeats_none(
    private_broker: PrivateBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await private_broker.up()
    bootstrap = private_broker.bootstrap
    topics = await fresh_topics(bootstrap)
    node, incarnation, reply_to = unique("node"), time.time_ns(), unique("api")
    handler = Recording(delay_s=0.25)
    before = make_commands(node, incarnation, reply_to, 30)
    after = make_commands(node, incarnation, reply_to, 20)
    commands = receiver(bootstrap, topics, node, incarnation, handler)
    await commands.start()
    try:
        await send_commands(bootstrap, topics[0], before)
        # A few executed (their outcomes acknowledged, perhaps committed), most still to run.
        await wait_for(lambda: len(handler.calls) >= 5, 30, "the first commands")
        await private_broker.down()
        stopped_at = len(handler.calls)
        await asyncio.sleep(10)
        during = len(handler.calls)
        await private_broker.up()
        await send_commands(bootstrap, topics[0], after)
        await wait_for(lambda: len(handler.calls) >= 50, 90, "every command to be executed")
        outcomes = await read_outcomes(
            bootstrap, topics[1], reply_to, {c.command_id for c in before + after}
        )
        await asyncio.sleep(2)  # nothing executed again once the commits go through
    finally:
        await commands.stop()
    expected = [c.command_id for c in before + after]
    executed = handler.executed()
    assert [cid for cid, n in executed.items() if n > 1] == []
    assert set(executed) == set(expected)
    # In the partition's order.
    assert list(executed) == expected
    answered = Counter(o.command_id for o in outcomes)
    assert set(answered) == set(expected)
    assert {o.status for o in outcomes} == {OutcomeStatus.DONE}
    assert {o.node_incarnation for o in outcomes} == {incarnation}
    stats = commands.stats()
    assert (stats.executed, stats.duplicates, stats.outcomes_abandoned) == (50, 0, 0)
    assert errors_from_this_project(caplog) == []
    duplicated = sum(n - 1 for n in answered.values())
    print(
        f"\nbroker restart: executed before the stop {stopped_at}, by the end of the outage "
        f"{during}; outcomes {len(outcomes)} for {len(expected)} commands ({duplicated} "
        f"duplicates); aiokafka ERROR lines: "
        f"{sum(1 for r in caplog.records if r.levelno >= logging.ERROR)}"
    )


async def test_a_restarted_receiver_answers_the_previous_incarnations_commands_without_acting(
    private_broker: PrivateBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver is stopped while commands are being executed (its gateway restarts) and a
    new NodeCommands starts with the node's new incarnation: the commands the old one executed
    are not read again, the old incarnation's others (read but not started, and those published
    while no receiver ran) are answered CONNECTION_GONE without reaching the handler, and the new
    incarnation's commands are executed once."""
    caplog.set_level(logging.DEBUG)
    await private_broker.up()
    bootstrap = private_broker.bootstrap
    topics = await fresh_topics(bootstrap)
    node, reply_to = unique("node"), unique("api")
    first, second = time.time_ns(), time.time_ns() + 1
    old_handler, new_handler = Recording(delay_s=0.1), Recording()
    old_commands = make_commands(node, first, reply_to, 30)
    while_down = make_commands(node, first, reply_to, 5)
    new_commands = make_commands(node, second, reply_to, 10)

    old = receiver(bootstrap, topics, node, first, old_handler)
    await old.start()
    await send_commands(bootstrap, topics[0], old_commands)
    await wait_for(lambda: len(old_handler.calls) >= 5, 30, "the first commands")
    await old.stop()
    ran = old_handler.executed()
    assert 5 <= len(ran) < 30  # stopped mid-way (the rest were read but not started)
    await send_commands(bootstrap, topics[0], while_down)

    new = receiver(bootstrap, topics, node, second, new_handler)
    async with new:
        await send_commands(bootstrap, topics[0], new_commands)
        every = old_commands + while_down + new_commands
        outcomes = await read_outcomes(
            bootstrap, topics[1], reply_to, {c.command_id for c in every}
        )

    assert [cid for cid, n in ran.items() if n > 1] == []
    assert list(ran) == [c.command_id for c in old_commands[: len(ran)]]
    # The new start executes only its own incarnation's commands, once each.
    assert list(new_handler.executed().elements()) == [c.command_id for c in new_commands]
    by_id: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_id.setdefault(o.command_id, []).append(o)
    assert set(by_id) == {c.command_id for c in every}
    for c in old_commands + while_down:
        statuses = {(o.status, o.node_incarnation) for o in by_id[c.command_id]}
        if c.command_id in ran:
            assert statuses == {(OutcomeStatus.DONE, first)}, c.command_id
        else:
            assert statuses == {(OutcomeStatus.CONNECTION_GONE, second)}, c.command_id
    for c in new_commands:
        assert {(o.status, o.node_incarnation) for o in by_id[c.command_id]} == {
            (OutcomeStatus.DONE, second)
        }
    assert errors_from_this_project(caplog) == []
    print(
        f"\nreceiver restart: the old start executed {len(ran)} of 30; outcomes "
        f"{len(outcomes)} for {len(every)} commands"
    )


async def test_a_receiver_stopped_during_an_outage_stops_and_its_successor_repeats_nothing(
    private_broker: PrivateBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway shuts down while the broker is away (its executed commands' offsets not
    committed): stop() still returns within its bound, and the next incarnation, once the
    broker is back, does not act on what the old one executed."""
    caplog.set_level(logging.DEBUG)
    await private_broker.up()
    bootstrap = private_broker.bootstrap
    topics = await fresh_topics(bootstrap)
    node, reply_to = unique("node"), unique("api")
    first, second = time.time_ns(), time.time_ns() + 1
    old_handler, new_handler = Recording(delay_s=0.1), Recording()
    old_commands = make_commands(node, first, reply_to, 20)
    old = NodeCommands(
        bootstrap,
        node,
        first,
        old_handler,
        commands_topic=topics[0],
        outcomes_topic=topics[1],
        drain_timeout_s=2,
    )
    await old.start()
    await send_commands(bootstrap, topics[0], old_commands)
    await wait_for(lambda: len(old_handler.calls) >= 3, 30, "the first commands")
    await private_broker.down()
    began = time.monotonic()
    await old.stop()
    took = time.monotonic() - began
    # It returns (it used to wait for the broker without end: aiokafka's commit waits for the
    # group's coordinator). Not within drain_timeout_s plus a send attempt: the loop is given
    # that (then cancelled), the final commit one attempt (5 s), and closing the outcomes
    # producer waits for its unacknowledged outcomes to expire (request_timeout_ms, 30 s
    # here): about 28 s measured.
    assert took < 50, took
    ran = old_handler.executed()
    await private_broker.up()

    async with receiver(bootstrap, topics, node, second, new_handler):
        outcomes = await read_outcomes(
            bootstrap, topics[1], reply_to, {c.command_id for c in old_commands}
        )
    assert [cid for cid, n in ran.items() if n > 1] == []
    assert new_handler.calls == []  # nothing of the old incarnation acted on again
    assert {o.command_id for o in outcomes} == {c.command_id for c in old_commands}
    answers = Counter((o.status.name, o.node_incarnation == second) for o in outcomes)
    print(
        f"\nstopped during an outage: stop() took {took:.1f} s; the old start executed "
        f"{len(ran)}; outcomes (status, from the new incarnation): {answers}"
    )
