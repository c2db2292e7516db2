"""What the conformance kit does to a gateway node from outside, as the tracker's own parts would:
read the events topic as the projector reads it (every record decoded by the projector's own
rules, core/events.py), send commands as the API sends them (keyed by the node id, on the
commands topic) and read their outcomes (keyed by the kit's own reply address), and open
WebSocket clients. It knows nothing of how the gateway is built."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from conntrack.core import aiokafka_internals, kafka
from conntrack.core.commands import Action, Command, Outcome, decode_outcome, encode_command
from conntrack.core.events import Event, InvalidEvent, decode_record
from conntrack.core.kafka import KafkaConnection
from conntrack.core.settings import Settings, env_name

log = logging.getLogger(__name__)

SECOND_NS = 1_000_000_000


class RuleFailed(AssertionError):
    """A rule of the node role the gateway broke; the message says how, in one line."""


class NotJudged(Exception):
    """A rule that cannot be judged against this gateway; the message says why."""


class KitBroken(Exception):
    """The kit itself cannot go on (a topic it cannot read): no verdict at all."""


@dataclass(frozen=True)
class Seen:
    """A record of the events topic, as read: its event (None if the projector's rules refuse
    it, then `error` says why), key and headers."""

    event: Event | None
    error: str
    key: bytes | None
    headers: dict[str, bytes]
    at: float  # monotonic time it was read


class Probe:
    """Async context manager: the kit's Kafka clients and its view of the events topic."""

    def __init__(
        self,
        settings: Settings,
        ws_url: str,
        node_id: str,
        timeout_s: float,
        restart_command: str = "",
    ) -> None:
        self.settings = settings
        self.restart_command = restart_command
        self.ws_url = ws_url
        self.node_id = node_id
        self.timeout_s = timeout_s
        self.reply_to = f"conformance-{uuid.uuid4().hex[:12]}"
        self._connection = KafkaConnection.from_settings(settings, "conformance")
        self._events: list[Seen] = []
        self._arrived = asyncio.Condition()
        self._outcomes: dict[str, list[Outcome]] = {}
        self._outcome_arrived = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        # Why the kit cannot read a topic any more (its reader ended), if it cannot.
        self._broken: str | None = None
        self._clients: list[Any] = []
        self._producer: AIOKafkaProducer | None = None
        self._events_consumer: AIOKafkaConsumer | None = None
        self._node_partition: TopicPartition | None = None
        self._node_end = 0

    async def __aenter__(self) -> Probe:
        options = self._connection.options()
        events = AIOKafkaConsumer(enable_auto_commit=False, **options)
        outcomes = AIOKafkaConsumer(enable_auto_commit=False, **options)
        producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **options)
        self._clients = [events, outcomes, producer]
        try:
            for client in self._clients:
                await kafka.start(client, self._connection)
            # The events from now on, and the node's own partition (its NodeStarted) from the
            # beginning: the node's events are keyed by its id.
            tps = await self._assign(events, "events_topic")
            node = tps[kafka.partition_of(self.node_id.encode(), len(tps))]
            self._node_end = (await events.end_offsets([node]))[node]
            events.seek(node, 0)
            self._events_consumer, self._node_partition = events, node
            await self._assign(outcomes, "command_outcomes_topic")
        except BaseException:
            await kafka.close(*self._clients)
            raise
        self._producer = producer
        self._tasks = [
            asyncio.create_task(self._reading("events", self._read_events(events))),
            asyncio.create_task(self._reading("outcomes", self._read_outcomes(outcomes))),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # each reader reported its end
        await kafka.close(*self._clients)

    async def _reading(self, what: str, read: Coroutine[Any, Any, None]) -> None:
        """A reader that ends only when cancelled; if it fails instead, every wait of the rules
        ends at once with why (a record the kit cannot read is no verdict on the gateway)."""
        try:
            await read
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._broken = f"cannot read the {what} topic any more: {type(exc).__name__}: {exc}"
            for condition in (self._arrived, self._outcome_arrived):
                async with condition:
                    condition.notify_all()

    async def _assign(self, consumer: AIOKafkaConsumer, setting: str) -> list[TopicPartition]:
        """Every partition of the topic a setting names, from its end as of now."""
        topic = getattr(self.settings, setting)
        partitions = await aiokafka_internals.topic_partitions(consumer, topic)
        if not partitions:
            raise NotJudged(f"the topic {topic} does not exist; check {env_name(setting)}")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolved now: what is sent later comes after it
            await consumer.position(tp)
        return tps

    async def _read_events(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            seen = []
            for records in batch.values():
                for record in records:
                    headers = dict(record.headers or ())
                    try:
                        event: Event | None = decode_record(record.value, record.key)
                        error = ""
                    except InvalidEvent as exc:
                        event, error = None, str(exc)
                    seen.append(Seen(event, error, record.key, headers, time.monotonic()))
            if seen:
                async with self._arrived:
                    self._events.extend(seen)
                    self._arrived.notify_all()

    async def _read_outcomes(self, consumer: AIOKafkaConsumer) -> None:
        key = self.reply_to.encode()
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            got = [
                decode_outcome(record.value)
                for records in batch.values()
                for record in records
                if record.key == key
            ]
            if got:
                async with self._outcome_arrived:
                    for outcome in got:
                        self._outcomes.setdefault(outcome.command_id, []).append(outcome)
                    self._outcome_arrived.notify_all()

    # -- the events topic ---------------------------------------------------------------------

    async def event(self, what: str, match: Callable[[Seen], bool], since: float = 0.0) -> Seen:
        """The first record read at or after `since` (monotonic) that matches, waiting up to the
        timeout; RuleFailed names `what` if none comes."""
        deadline = time.monotonic() + self.timeout_s
        async with self._arrived:
            while True:
                if self._broken:
                    raise KitBroken(self._broken)
                for seen in self._events:
                    if seen.at >= since and match(seen):
                        return seen
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuleFailed(f"no {what} within {self.timeout_s:g} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)

    def events_of(self, match: Callable[[Seen], bool]) -> list[Seen]:
        return [seen for seen in self._events if match(seen)]

    async def caught_up_on_node(self) -> None:
        """Wait until the node's partition has been read as far as it went when the kit
        started (its newest NodeStarted is then in hand)."""
        assert self._events_consumer is not None
        assert self._node_partition is not None
        deadline = time.monotonic() + self.timeout_s
        while await self._events_consumer.position(self._node_partition) < self._node_end:
            if time.monotonic() > deadline:
                raise RuleFailed(f"the node's partition was not read within {self.timeout_s:g} s")
            await asyncio.sleep(0.1)

    # -- commands -----------------------------------------------------------------------------

    async def command(
        self,
        action: Action,
        *,
        incarnation: int,
        connection_id: str = "",
        command_id: str = "",
        expires_at_ns: int | None = None,
    ) -> str:
        """Send a command to the node as the API does; returns its id."""
        assert self._producer is not None
        now = time.time_ns()
        command = Command(
            command_id=command_id or uuid.uuid4().hex,
            node_id=self.node_id,
            node_incarnation=incarnation,
            connection_id=connection_id,
            issued_at_ns=now,
            expires_at_ns=(
                now + int(self.timeout_s * SECOND_NS) if expires_at_ns is None else expires_at_ns
            ),
            reply_to=self.reply_to,
            action=action,
        )
        await self._producer.send_and_wait(
            self.settings.commands_topic, encode_command(command), key=self.node_id.encode()
        )
        return command.command_id

    async def outcomes(self, command_id: str, count: int = 1) -> list[Outcome]:
        """The first `count` outcomes of a command, waiting up to the timeout."""
        deadline = time.monotonic() + self.timeout_s
        async with self._outcome_arrived:
            while len(self._outcomes.get(command_id, ())) < count:
                if self._broken:
                    raise KitBroken(self._broken)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = len(self._outcomes.get(command_id, ()))
                    raise RuleFailed(
                        f"{got} outcome(s) of command {command_id} within {self.timeout_s:g} s, "
                        f"not {count}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._outcome_arrived.wait(), remaining)
            return self._outcomes[command_id][:count]

    async def outcome(self, command_id: str) -> Outcome:
        return (await self.outcomes(command_id))[0]

    # -- sockets ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def socket(self) -> AsyncIterator[tuple[ClientConnection, str]]:
        """A WebSocket client of the gateway, with a User-Agent of its own by which its
        Connected event is known (no gateway has to tell a client its id)."""
        marker = f"conntrack-conformance/{uuid.uuid4().hex}"
        try:
            client = await connect(self.ws_url, user_agent_header=marker, open_timeout=10)
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise RuleFailed(f"cannot open a WebSocket to {self.ws_url}: {exc}") from None
        async with client:
            yield client, marker
