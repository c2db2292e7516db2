"""The API's end of the command channel (core/commands.py): Send and Disconnect
become commands on the commands topic, keyed by the node holding the socket, and the call waits
for the node's outcome on the outcomes topic.

Each API process has its own reply address (a random id, the key of its outcome records). It
reads every partition of the outcomes topic from the end as of its start, outside any consumer
group, and picks out its own outcomes by command id: simple, and cheap at the rate commands are
made (every API process reads every outcome; with very many API processes a partition per
process would be the next step).

The Kafka clients connect in the background and reconnect by themselves: an API whose broker is
away keeps answering Get, and Send/Disconnect answer UNAVAILABLE meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from conntrack.core import kafka, tracing
from conntrack.core.commands import (
    Action,
    Batching,
    Command,
    InvalidCommand,
    Outcome,
    decode_outcome,
    encode_command,
)
from conntrack.core.kafka import (
    KafkaConnection,
    KafkaSetupError,
    KeyPartitioner,
    connection_of,
)
from conntrack.core.retry import Backoff, one_line

log = logging.getLogger(__name__)


class CommandChannelUnavailable(RuntimeError):
    """The command could not be handed to the broker, or no outcome came in time."""


class CommandNotHanded(CommandChannelUnavailable):
    """The command was not handed to the broker (not connected, or it was refused or not
    acknowledged): taken as not sent."""


class CommandChannel:
    """Async context manager; start() returns at once and connects in the background."""

    def __init__(
        self,
        servers: str | KafkaConnection,
        commands_topic: str,
        outcomes_topic: str,
        *,
        linger_ms: int | None = None,
        fetch_wait_ms: int | None = None,
    ) -> None:
        """linger_ms, fetch_wait_ms: the channel's Kafka batching; default the settings
        commands_linger_ms and commands_fetch_wait_ms."""
        self._connection = connection_of(servers, "api")
        self._batching = Batching.of(linger_ms, fetch_wait_ms)
        # Set when the broker refused a setting (credentials, the CA): retrying cannot help.
        self.failure: KafkaSetupError | None = None
        self._commands_topic = commands_topic
        self._outcomes_topic = outcomes_topic
        self.reply_to = f"api-{uuid.uuid4().hex}"
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._ready = asyncio.Event()
        self._waiting: dict[str, asyncio.Future[Outcome]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(CommandChannelUnavailable("the API is stopping"))
        self._waiting.clear()

    async def __aenter__(self) -> CommandChannel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def _run(self) -> None:
        """Connect (retrying with backoff), then read outcomes until stopped."""
        delays = Backoff(max_s=5.0).delays()
        while True:
            producer = AIOKafkaProducer(
                **self._connection.options(),
                acks="all",
                enable_idempotence=True,
                linger_ms=self._batching.linger_ms,
                partitioner=KeyPartitioner(),
            )
            consumer = AIOKafkaConsumer(
                **self._connection.options(),
                group_id=None,
                enable_auto_commit=False,
                **self._batching.consumer_options(),
            )
            try:
                await kafka.start(producer, self._connection)
                await kafka.start(consumer, self._connection)
                # Asked of the full metadata first: partitions_for() would spin on a missing
                # topic, aiokafka logging an error each time.
                missing = {self._commands_topic, self._outcomes_topic} - await consumer.topics()
                if missing:
                    raise KafkaError(
                        f"topics {sorted(missing)} do not exist (conntrack-producer topics "
                        "creates them)"
                    )
                partitions = await producer.partitions_for(self._outcomes_topic)
                tps = [TopicPartition(self._outcomes_topic, p) for p in sorted(partitions)]
                consumer.assign(tps)
                await consumer.seek_to_end(*tps)
                for tp in tps:  # resolve the end positions now: later outcomes are ours to see
                    await consumer.position(tp)
                self._producer, self._consumer = producer, consumer
                self._ready.set()
                log.info("event=command_channel_ready reply_to=%s", self.reply_to)
                await self._read_outcomes(consumer)
            except (KafkaError, OSError) as exc:
                log.warning("event=command_channel_retry error=%r", one_line(exc))
            except KafkaSetupError as exc:
                self.failure = exc
                log.error("event=command_channel_failed error=%r", str(exc))
                return
            finally:
                self._ready.clear()
                self._producer = self._consumer = None
                await kafka.close(consumer, producer)
            await asyncio.sleep(next(delays))

    async def _read_outcomes(self, consumer: AIOKafkaConsumer) -> None:
        reply_to = self.reply_to.encode()
        while True:
            batch: dict[Any, list[Any]] = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    if record.key != reply_to:
                        continue
                    try:
                        outcome = decode_outcome(record.value)
                    except InvalidCommand as exc:
                        log.warning("event=outcome_undecodable error=%r", str(exc))
                        continue
                    waiter = self._waiting.get(outcome.command_id)
                    if waiter is not None and not waiter.done():
                        with tracing.processing(record.topic, record.headers):
                            waiter.set_result(outcome)

    async def execute(
        self,
        *,
        node_id: str,
        node_incarnation: int,
        connection_id: str,
        action: Action,
        timeout_s: float,
        command_id: str = "",
    ) -> Outcome:
        """Hand the command to the broker and wait for its outcome, at most timeout_s. Raises
        CommandChannelUnavailable if the broker cannot be reached or no outcome comes
        (CommandNotHanded if the broker did not acknowledge it). command_id: default a new
        random one."""
        producer = self._producer
        if producer is None:
            raise CommandNotHanded(
                f"the command channel cannot use Kafka: {self.failure}"
                if self.failure is not None
                else "the command channel is not connected to Kafka"
            )
        now = time.time_ns()
        command = Command(
            command_id=command_id or uuid.uuid4().hex,
            node_id=node_id,
            node_incarnation=node_incarnation,
            connection_id=connection_id,
            issued_at_ns=now,
            expires_at_ns=now + int(timeout_s * 1e9),
            reply_to=self.reply_to,
            action=action,
        )
        waiter: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting[command.command_id] = waiter
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    with tracing.sending(self._commands_topic, node_id) as context:
                        delivery = await producer.send(
                            self._commands_topic,
                            encode_command(command),
                            key=node_id.encode(),
                            headers=context or None,
                        )
                except KafkaError as exc:
                    raise CommandNotHanded(
                        f"the command could not be handed to Kafka: {one_line(exc)}"
                    ) from None
                # The acknowledgement and the outcome are awaited together (one wake-up per
                # call, not two): a failed delivery fails the wait. aiokafka's own future is
                # never cancelled by a caller that leaves, and its error is always retrieved.
                delivery.add_done_callback(functools.partial(_delivered, waiter))
                return await waiter
        except TimeoutError:
            raise CommandChannelUnavailable(
                f"no outcome from gateway node {node_id} within {timeout_s:.3g} s"
            ) from None
        finally:
            self._waiting.pop(command.command_id, None)


def _delivered(waiter: asyncio.Future[Outcome], delivery: asyncio.Future[Any]) -> None:
    """The command's acknowledgement: if it failed, the wait for its outcome fails too (unless
    the outcome is in already, or the caller has left)."""
    if delivery.cancelled():
        error: str = "the command channel stopped before the broker acknowledged it"
    elif (exc := delivery.exception()) is not None:
        error = one_line(exc)
    else:
        return
    if not waiter.done():
        waiter.set_exception(CommandNotHanded(f"the command could not be handed to Kafka: {error}"))
