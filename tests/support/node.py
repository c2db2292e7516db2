"""A gateway node played by the test: it reads every command and answers as a node would, and
the open connection states that put sockets on it."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from conntrack.core.commands import (
    Command,
    Outcome,
    OutcomeStatus,
    decode_command,
    encode_outcome,
)
from conntrack.core.fold import ConnectionState
from conntrack.core.settings import Settings


def open_state(cid: str, node: str | None, incarnation: int | None, now: int) -> ConnectionState:
    return ConnectionState(
        cid,
        gateway_id="gw",
        source_ip="10.0.0.1",
        user_agent="ua",
        connected_at_ns=now - 10**9,
        connected_event_id=f"c-{cid}",
        last_active_at_ns=now - 10**9,
        node_id=node,
        node_incarnation=incarnation,
    )


class PlayedNode:
    """Reads every command and answers by connection id: DONE unless told otherwise; a
    connection in `silent` gets no answer."""

    def __init__(self, settings: Settings, commands: str, outcomes: str) -> None:
        self._bootstrap = settings.kafka_bootstrap_servers
        self._commands, self._outcomes = commands, outcomes
        self.received: list[tuple[bytes | None, Command]] = []
        self.answers: dict[str, OutcomeStatus] = {}
        self.silent: set[str] = set()

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            self._commands, bootstrap_servers=self._bootstrap, auto_offset_reset="earliest"
        )
        producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap)
        await consumer.start()
        await producer.start()
        try:
            async for record in consumer:
                command = decode_command(record.value, record.key)
                self.received.append((record.key, command))
                if command.connection_id in self.silent:
                    continue
                status = self.answers.get(command.connection_id, OutcomeStatus.DONE)
                outcome = Outcome(
                    command.command_id,
                    command.node_id,
                    command.node_incarnation,
                    time.time_ns(),
                    status,
                )
                await producer.send_and_wait(
                    self._outcomes, encode_outcome(outcome), key=command.reply_to.encode()
                )
        finally:
            await consumer.stop()
            await producer.stop()
