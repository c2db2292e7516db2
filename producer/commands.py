"""The node's command receiver: how the API's Send and Disconnect reach the socket they name.

The API writes a Command (core/commands.py) to the commands topic, keyed by the
UTF-8 node id of the node holding the socket, and waits for the Outcome keyed by the command's
reply_to on the outcomes topic. A node's NodeCommands:

- reads only the partition of the commands topic that the node's key falls on, computed with
  aiokafka's own DefaultPartitioner (murmur2, as the Java client and the API's producer do), by
  manual assignment in a consumer group of its own (`conntrack-node.<node_id>` by default) that
  holds only committed offsets: a restarted node (a new incarnation) goes on after the last
  command the previous one finished, and a node that never ran starts at the partition's end;
- skips records of other node ids sharing the partition, and records that are not valid commands
  (logged once each);
- answers CONNECTION_GONE for a command of an older incarnation of this node (its sockets died
  with that start), leaves a command of a *newer* incarnation alone (a newer start of this node
  runs somewhere and answers it), answers EXPIRED for a command read after its expires_at, and
  otherwise calls the gateway's handler (CommandHandler): `send` / `disconnect` return False when
  the node holds no such socket (CONNECTION_GONE); an exception or running past the command's
  deadline is FAILED, with the reason in `detail`;
- publishes the Outcome keyed by reply_to and waits for the broker's acknowledgement; the
  command's offset is committed once its outcome and every earlier one's are acknowledged
  (producer/command_progress.py). A command is executed at most once: the ids of the last
  `remember` commands are kept with their outcomes, and a command read again (a redelivery, or an
  API that published it twice) only has its remembered outcome published again.

Commands run one at a time, in the partition's order, so a Send and then a Disconnect of one
socket happen in that order. The outcomes producer is not idempotent on purpose: an outcome
published twice is harmless (the API takes the first one for a command id), and a
non-idempotent producer has no sequence numbers that a failed batch could leave with a gap
(docs/producer.md, "Long outages"). While the broker is away the consumer and producer
reconnect by themselves; an outcome that cannot be acknowledged is retried until the command's
deadline has passed (nobody waits for it then) or the receiver stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from conntrack.core import aiokafka_internals, kafka, tracing
from conntrack.core.commands import (
    Batching,
    Command,
    InvalidCommand,
    decode_command,
    decode_outcome,
    encode_outcome,
)
from conntrack.core.ids import id_problem
from conntrack.core.kafka import KafkaConnection, KeyPartitioner, connection_of, partition_of
from conntrack.core.settings import default
from conntrack.producer.command_execution import (
    CommandExecutor,
    CommandHandler,
    NodeCommandsStats,
)
from conntrack.producer.command_progress import CommandProgress
from conntrack.producer.errors import BrokerUnavailableError, TopicNotFoundError

log = logging.getLogger(__name__)

GROUP_PREFIX: Final = "conntrack-node."
_POLL_MS: Final = 200
_RETRY_S: Final = 0.5
_SEND_ATTEMPT_S: Final = 5.0
# The outcome producer's batch size per partition (aiokafka's default is 16 KiB); below the
# broker's default message.max.bytes and the producer's max_request_size (1 MB).
_OUTCOME_BATCH_BYTES: Final = 512 * 1024


def partition_for_node(node_id: str, partitions: int) -> int:
    """The partition of the commands topic a node's commands are on: aiokafka's default
    partitioner on the UTF-8 node id, the same as the API's producer uses (murmur2, as the Java
    client, franz-go and librdkafka's murmur2_random)."""
    return partition_of(node_id.encode(), partitions)


class NodeCommands:
    """Receive and execute this node's commands. Async context manager; start() and stop() are
    idempotent, stop() lets the command in progress finish (its outcome published and its
    offset committed) and returns within about `drain_timeout_s`.

    incarnation: this node's current incarnation, or a function returning it (for a Publisher
        that may be restarted: `lambda: publisher.incarnation`); read for every command.
    group_id: the consumer group holding this node's committed offset; default
        `conntrack-node.<node_id>`. One group per node id: two processes with one node id
        would share it.
    remember: how many executed command ids are kept (at least; up to twice as many) to act on
        a redelivered one once.
    linger_ms, fetch_wait_ms: the channel's Kafka batching; default the settings
        commands_linger_ms and commands_fetch_wait_ms.
    """

    def __init__(
        self,
        bootstrap_servers: str | KafkaConnection,
        node_id: str,
        incarnation: int | Callable[[], int | None],
        handler: CommandHandler,
        *,
        commands_topic: str | None = None,
        outcomes_topic: str | None = None,
        group_id: str | None = None,
        remember: int = 100_000,
        start_timeout_s: float = 30.0,
        drain_timeout_s: float = 10.0,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        linger_ms: int | None = None,
        fetch_wait_ms: int | None = None,
        **client_options: Any,
    ) -> None:
        if (problem := id_problem("node_id", node_id)) is not None:
            raise ValueError(problem)
        if remember < 1:
            raise ValueError("remember must be >= 1")
        self._connection = connection_of(bootstrap_servers, "node-commands")
        self._bootstrap_servers = self._connection.bootstrap_servers
        self._node_id = node_id
        self._key = node_id.encode()
        self._incarnation = incarnation
        self._handler = handler
        self._commands_topic = commands_topic or str(default("commands_topic"))
        self._outcomes_topic = outcomes_topic or str(default("command_outcomes_topic"))
        self._group_id = group_id or GROUP_PREFIX + node_id
        self._remember = remember
        self._start_timeout_s = start_timeout_s
        self._drain_timeout_s = drain_timeout_s
        self._wall_clock_ns = wall_clock_ns
        self._batching = Batching.of(linger_ms, fetch_wait_ms)
        self._client_options = client_options
        # Executed commands' encoded outcomes by command id, in two generations of plain dicts
        # of str and bytes, which the cyclic garbage collector does not track (100,000 Outcome
        # objects in an OrderedDict made every full collection walk them: a pause of tens of
        # milliseconds, 150 ms on a busy machine, for every command in flight). When the newer
        # holds `remember` ids the older is dropped: the last `remember` (to twice that) are
        # kept.
        self._done: dict[str, bytes] = {}
        self._done_before: dict[str, bytes] = {}
        self._stats = NodeCommandsStats()
        self._executor = CommandExecutor(handler, node_id, wall_clock_ns, self._stats)
        self._lifecycle = asyncio.Lock()
        self._consumer: Any = None
        self._producer: Any = None
        self._tp: TopicPartition | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._progress = CommandProgress(node_id)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def partition(self) -> int | None:
        """The commands topic's partition this node reads (None before start())."""
        return None if self._tp is None else self._tp.partition

    @property
    def started(self) -> bool:
        return self._loop_task is not None

    def stats(self) -> NodeCommandsStats:
        return NodeCommandsStats(**{**self._stats.__dict__, "outcomes": dict(self._stats.outcomes)})

    def _current_incarnation(self) -> int | None:
        return self._incarnation() if callable(self._incarnation) else self._incarnation

    async def start(self) -> None:
        """Connect, find the node's partition and its committed offset (none yet: the
        partition's end, committed at once), and start receiving. Raises
        BrokerUnavailableError if the broker cannot be reached within start_timeout_s, and
        TopicNotFoundError if a topic is missing."""
        async with self._lifecycle:
            if self._loop_task is not None:
                return
            if not self._current_incarnation():
                raise ValueError("no incarnation yet: start the node's Publisher first")
            consumer = AIOKafkaConsumer(
                **self._connection.options(),
                group_id=self._group_id,
                enable_auto_commit=False,
                auto_offset_reset="latest",
                **self._batching.consumer_options(),
                **self._client_options,
            )
            producer = AIOKafkaProducer(
                **self._connection.options(),
                acks="all",
                enable_idempotence=False,
                linger_ms=self._batching.linger_ms,
                # Every outcome for one API goes to one partition (keyed by its reply_to), and
                # aiokafka sends one batch per partition at a time: with the default 16 KiB
                # (~100 outcomes) a node catching up on a large poll had hundreds of outcome
                # tasks wait for each batch to drain, every drain waking them all (a quarter of
                # the node's CPU in aiokafka's wait_drain). Room for a few thousand per request
                # instead; a batch goes out when the linger has passed, full or not.
                max_batch_size=_OUTCOME_BATCH_BYTES,
                partitioner=KeyPartitioner(),
                request_timeout_ms=max(1000, int(self._start_timeout_s * 1000)),
                **self._client_options,
            )
            try:
                async with asyncio.timeout(self._start_timeout_s):
                    await kafka.start(consumer, self._connection)
                    await kafka.start(producer, self._connection)
                    self._tp = await self._assign(consumer, producer)
            except TimeoutError as exc:
                await kafka.close(consumer, producer)
                raise BrokerUnavailableError(
                    f"cannot reach Kafka at {self._bootstrap_servers} within "
                    f"{self._start_timeout_s:g} s"
                ) from exc
            except KafkaConnectionError as exc:
                await kafka.close(consumer, producer)
                raise BrokerUnavailableError(
                    f"cannot reach Kafka at {self._bootstrap_servers}: {exc}"
                ) from exc
            except BaseException:
                await kafka.close(consumer, producer)
                raise
            self._consumer, self._producer = consumer, producer
            self._stopping = asyncio.Event()
            self._progress = CommandProgress(self._node_id)
            self._progress.start(consumer, self._tp)
            self._loop_task = asyncio.create_task(self._receive(), name="node-commands")
            log.info(
                "event=commands_started node_id=%s topic=%s partition=%d group=%s",
                self._node_id,
                self._commands_topic,
                self._tp.partition,
                self._group_id,
            )

    async def _assign(self, consumer: Any, producer: Any) -> TopicPartition:
        for topic in (self._commands_topic, self._outcomes_topic):
            # A topic created a moment ago may be missing from the first metadata answer.
            for attempt in range(5):
                if topic in await consumer.topics():  # a metadata request for every topic
                    break
                if attempt == 4:
                    raise TopicNotFoundError(
                        f"topic {topic} does not exist at {self._bootstrap_servers}; "
                        "create it with `conntrack-producer topics`"
                    )
                await asyncio.sleep(0.2)
        partitions = await producer.partitions_for(self._commands_topic)
        tp = TopicPartition(
            self._commands_topic, partition_for_node(self._node_id, len(partitions))
        )
        consumer.assign([tp])
        # Not consumer.committed(): right after a broker start it can answer "nothing
        # committed" for a group that has an offset (aiokafka_internals.committed_offset says why).
        committed = await aiokafka_internals.committed_offset(consumer, tp)
        if committed is None:
            # Never ran: start at the end (earlier commands are for no start of this node that
            # could still hold a socket), and commit it, so that whatever arrives from now on is
            # read by this start or the next one.
            await consumer.seek_to_end(tp)
            position = await consumer.position(tp)
            await consumer.commit({tp: position})
        else:
            consumer.seek(tp, committed)
        return tp

    async def stop(self) -> None:
        """Finish the command in progress (its outcome and commit), then close. Commands read
        but not started are left for the next start, which reads them again."""
        async with self._lifecycle:
            task, self._loop_task = self._loop_task, None
            if task is None:
                return
            self._stopping.set()
            try:
                # The command's run, then its outcome's retries (one attempt may take 5 s).
                async with asyncio.timeout(self._drain_timeout_s + _SEND_ATTEMPT_S + 1):
                    await asyncio.shield(task)
            except TimeoutError:
                log.warning("event=commands_stop_timeout node_id=%s", self._node_id)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            consumer, producer = self._consumer, self._producer
            # The last batches' outcomes (each retried until acknowledged or given up), and
            # their commits; only then are the clients closed (the outcomes' tasks publish
            # through the producer until here).
            await self._progress.finish(self._drain_timeout_s + _SEND_ATTEMPT_S + 1)
            self._consumer = self._producer = None
            await kafka.close(consumer, producer)
            log.info("event=commands_stopped node_id=%s", self._node_id)

    close = stop

    async def __aenter__(self) -> NodeCommands:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the loop ----------------------------------------------------------------------------

    async def _receive(self) -> None:
        assert self._tp is not None
        tp, consumer = self._tp, self._consumer
        while not self._stopping.is_set():
            try:
                batch = await consumer.getmany(tp, timeout_ms=_POLL_MS)
                # Commands are executed one after another, in order; their outcomes go out
                # without waiting for one another's acknowledgement (a commit and an
                # acknowledgement per command held one node to ~140 commands/s), and the next
                # batch is read while this one's are acknowledged and committed in the
                # background (producer/command_progress.py).
                publishing: list[asyncio.Task[None]] = []
                for record in batch.get(tp, []):
                    if self._stopping.is_set():
                        break
                    if record.key != self._key:
                        self._stats.received += 1
                        self._stats.other_nodes += 1
                    else:
                        # The API call's trace continues here (tracing off: no span).
                        with tracing.processing(tp.topic, record.headers):
                            await self._handle(record, publishing)
                    self._progress.advanced(record.offset + 1)
                self._progress.batch_read(publishing)
                await self._progress.hold_back(publishing)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=commands_loop_error node_id=%s", self._node_id)
                await asyncio.sleep(_RETRY_S)

    async def _handle(self, record: Any, publishing: list[asyncio.Task[None]]) -> bool:
        """Act on one record; True if an outcome is being published for it (its task is added
        to `publishing`)."""
        self._stats.received += 1
        try:
            command = decode_command(record.value, record.key)
        except InvalidCommand as exc:
            self._stats.invalid += 1
            log.warning(
                "event=invalid_command partition=%d offset=%d error=%s",
                record.partition,
                record.offset,
                exc,
            )
            return False
        known = self._done.get(command.command_id) or self._done_before.get(command.command_id)
        if known is not None:
            self._stats.duplicates += 1
            publishing.append(asyncio.create_task(self._publish(command, known)))
            return True
        incarnation = self._current_incarnation() or 0
        if command.node_incarnation > incarnation:
            # A newer start of this node exists (this process is an old one still running).
            self._stats.other_nodes += 1
            return False
        outcome = encode_outcome(await self._executor.execute(command, incarnation))
        self._remember_outcome(command.command_id, outcome)
        publishing.append(asyncio.create_task(self._publish(command, outcome)))
        return True

    def _remember_outcome(self, command_id: str, outcome: bytes) -> None:
        if len(self._done) >= self._remember:
            self._done_before, self._done = self._done, {}
        self._done[command_id] = outcome

    async def _publish(self, command: Command, value: bytes) -> None:
        """Publish the (encoded) outcome and wait for its acknowledgement; retry until
        acknowledged, the command's deadline has passed, or the receiver stops (then after
        drain_timeout_s)."""
        key = command.reply_to.encode()
        loop = asyncio.get_running_loop()
        stop_deadline: float | None = None
        while True:
            producer = self._producer
            if producer is None:  # stop() gave up waiting and closed the clients
                self._abandon(command, value, "the receiver has stopped")
                return
            try:
                async with asyncio.timeout(_SEND_ATTEMPT_S):
                    with tracing.sending(self._outcomes_topic, command.reply_to) as context:
                        future = await producer.send(
                            self._outcomes_topic, value, key=key, headers=context or None
                        )
                    await future
                return
            except (KafkaError, TimeoutError) as exc:
                error: BaseException = exc
            if self._stopping.is_set():
                stop_deadline = stop_deadline or loop.time() + self._drain_timeout_s
            past_deadline = (
                command.expires_at_ns > 0 and self._wall_clock_ns() > command.expires_at_ns
            )
            if past_deadline or (stop_deadline is not None and loop.time() >= stop_deadline):
                self._abandon(command, value, repr(error))
                return
            await asyncio.sleep(_RETRY_S)

    def _abandon(self, command: Command, value: bytes, error: str) -> None:
        self._stats.outcomes_abandoned += 1
        log.warning(
            "event=outcome_abandoned command_id=%s status=%s error=%s",
            command.command_id,
            decode_outcome(value).status.name,
            error,
        )
