"""The publisher gateway nodes use: one call per connection event, safe and cheap.

Each event gets a fresh UUID event id and the gateway's clock in nanoseconds; the record key is
the connection id, so one connection's events land on one partition in order. The producer is
idempotent with acks from all in-sync replicas, so broker retries never duplicate or reorder.
Concurrent calls are ordered per partition (producer/lanes.py): a partition that cannot take
events (its leader is away) holds up the calls of its own connections only.

Activity is coalesced per connection (producer/coalescing.py): at most one Activity event per
`activity_interval_s`, carrying the latest activity time, flushed before the connection's
Disconnected and on flush()/stop().

Failure behaviour, in one rule: every event handed in is either acknowledged by the broker, or
counted in `undelivered` and passed to `on_undeliverable` exactly once; in addition the call that
handed it in (or the next flush()/stop()) raises. Memory is bounded by `max_pending`
unacknowledged events: beyond it, publishing waits (backpressure), and gives up with
BrokerUnavailableError after `delivery_timeout_s`. Once any delivery fails, a fresh producer
takes over (see _replace_producer_soon), so one failure never stops the events after it.

The node role (node_id=...): start() chooses an incarnation (producer/node.py) and publishes
NodeStarted, acknowledged before any connection event can be handed in; Connected events carry
the node id and incarnation; a background task publishes NodeHeartbeat every
heartbeat_interval_s. The node's own events are outside the rule above: they are not counted in
delivered/undelivered and never reach on_undeliverable. A heartbeat that cannot be handed over
at once, or is not acknowledged, is dropped (counted in heartbeats_dropped): the next one says
the same, newer. One heartbeat at most is unacknowledged at a time.

The durable spool (spool_dir=..., producer/spool.py; docs/producer.md, "Durable spool"): instead
of reporting an event it could not deliver, the publisher writes it to disk, and from the first
failure on every new event goes to the spool too, behind the others, until a replayer task has
delivered the whole spool, in order; then events go straight to the broker again. Only an event
the full spool refuses is reported as above (SpoolFullError). What the spool holds survives a
crash of the process and is replayed by the next start() with the same directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaError, KafkaTimeoutError

from conntrack.core.events import (
    HEADERS,
    MIN_TIME_NS,
    Activity,
    Connected,
    Disconnected,
    Event,
    InvalidEvent,
    NodeHeartbeat,
    NodeStarted,
    Payload,
    decode_tuple,
    encode,
    record_key,
)
from conntrack.core.kafka import KafkaConnection, connection_of
from conntrack.core.settings import default
from conntrack.producer import kafka_producer
from conntrack.producer.coalescing import ActivityCoalescer, CoalescedActivity
from conntrack.producer.errors import (
    BrokerUnavailableError,
    DeliveryTimeoutError,
    PublisherClosedError,
    PublisherError,
    UndeliveredEventsError,
)
from conntrack.producer.lanes import Lanes, Ticket
from conntrack.producer.node import next_incarnation
from conntrack.producer.spool import Spool, SpoolFullError
from conntrack.producer.validation import check_frames, check_id, check_time, checked_value

log = logging.getLogger(__name__)

UndeliverableCallback = Callable[[Event, BaseException], None]

# Spool replay: records per round (each round waits for its acknowledgements), and the pause
# after a round failed (the broker is still away) or while no producer can take them.
_REPLAY_BATCH = 1000
_REPLAY_RETRY_S = 0.5
# aiokafka holds one batch per partition and send() waits while it is full and cannot be sent
# (its leader is away: a broker failover takes about 10 s). Its default, 16 KiB (some 160
# events), made calls wait within a second of a failover; 1 MiB (the broker's default
# message.max.bytes is 1 MiB + 12 bytes, so a full batch is still accepted) holds some 7,000
# events of the partition: docs/producer.md, "Failure behaviour".
DEFAULT_MAX_BATCH_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class PublisherStats:
    delivered: int
    """Events the broker acknowledged."""
    undelivered: int
    """Events that could not be delivered (each also went to on_undeliverable)."""
    in_flight: int
    """Events handed to the producer and not yet acknowledged."""
    pending_activities: int
    """Connections with coalesced activity not yet published."""
    coalesced_activities: int
    """activity() calls merged into another Activity event instead of publishing their own."""
    heartbeats_delivered: int = 0
    """NodeHeartbeat events the broker acknowledged (node role only)."""
    heartbeats_dropped: int = 0
    """NodeHeartbeat events not sent or not acknowledged (node role only; see the module doc)."""
    spooled: int = 0
    """Events written to the durable spool instead of being reported (spool_dir only)."""
    replayed: int = 0
    """Spooled events the broker acknowledged when the spool was replayed."""
    spool_refused: int = 0
    """Events the full spool refused: a new one is also counted in undelivered (SpoolFullError);
    one in flight at the switch to spooling only if it then fails."""
    spool_pending: int = 0
    """Events in the spool not yet acknowledged by the broker (including the previous run's)."""
    spool_bytes: int = 0
    """Bytes the spool's segment files (and its write buffer) take; at most spool_max_bytes."""
    spool_lost: int = 0
    """Events the disk refused to write (a failing disk; each logged as an error)."""


class Publisher:
    """Async context manager. start() and stop() are idempotent; stop() (alias close()) flushes.

    bootstrap_servers: where and how to connect: bootstrap servers alone (plain Kafka, client
        id conntrack-publisher) or a KafkaConnection (TLS, SASL; core/kafka.py).
    activity_interval_s: coalescing interval per connection; 0 publishes every activity call.
    delivery_timeout_s: how long the broker may take to accept and acknowledge events (also
        bounds start(), flush() and stop()).
    max_pending: unacknowledged events held in memory before publishing waits.
    on_undeliverable: called once per event that could not be delivered, with the cause; it runs
        on the event loop and must not block.
    node_id: take the node role (see the module doc and docs/producer.md, "The node role"):
        this gateway node's id, 1..255 characters, no NUL. None: no node role.
    heartbeat_interval_s: how often the node role publishes NodeHeartbeat; keep it well below
        the readers' lease (CONNTRACK_NODE_LEASE_SECONDS, 30 s by default).
    spool_dir: a directory for the durable spool (see the module doc); None: no spool, events
        that cannot be delivered are reported. One Publisher per directory.
    spool_max_bytes: the most disk space the spool takes; an event beyond it is refused.
    """

    def __init__(
        self,
        bootstrap_servers: str | KafkaConnection,
        topic: str,
        gateway_id: str,
        *,
        activity_interval_s: float = 1.0,
        delivery_timeout_s: float = default("gateway_delivery_timeout_seconds"),
        max_pending: int = 10_000,
        on_undeliverable: UndeliverableCallback | None = None,
        node_id: str | None = None,
        heartbeat_interval_s: float = 5.0,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = default("gateway_spool_max_bytes"),
        linger_ms: int = 5,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        **producer_options: Any,
    ) -> None:
        check_id("gateway_id", gateway_id)
        if activity_interval_s < 0:
            raise ValueError("activity_interval_s must be >= 0")
        if delivery_timeout_s <= 0:
            raise ValueError("delivery_timeout_s must be > 0")
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        if not heartbeat_interval_s > 0:
            raise ValueError("heartbeat_interval_s must be > 0")
        if node_id is not None:
            # The one check every event goes through, on the node's first event as it will be.
            checked_value(
                Event(str(uuid.uuid4()), "", gateway_id, MIN_TIME_NS, NodeStarted(node_id, 1))
            )
        self._node_id = node_id
        self._heartbeat_interval_s = heartbeat_interval_s
        self._spool = None if spool_dir is None else Spool(spool_dir, spool_max_bytes)
        # While set, every new event goes to the spool (behind what it holds): from the first
        # failure until the replayer has delivered the whole spool.
        self._spooling = False
        # In-flight events also written to the spool: their failure is not reported, and one
        # acknowledged after all is not replayed (a lost entry here only means a duplicate).
        self._spooled_ids: set[str] = set()
        # In-flight events the full spool could not take at the switch: if they fail, they are
        # reported (a later copy would land behind newer events of their connection).
        self._unspooled_ids: set[str] = set()
        self._skip_replay: set[str] = set()
        self._replayer: asyncio.Task[None] | None = None
        self._replay_futures: list[asyncio.Future[Any]] = []
        self._spooled = 0
        self._replayed = 0
        self._spool_refused = 0
        self._spool_refusing = False
        # The oldest in-flight event and when it was first seen oldest (_watch_in_flight).
        self._oldest: tuple[asyncio.Future[Any], float] | None = None
        self._incarnation: int | None = None
        self._heartbeater: asyncio.Task[None] | None = None
        # The one unacknowledged heartbeat, and the producer it was handed to.
        self._heartbeat_in_flight: asyncio.Future[Any] | None = None
        self._heartbeats_delivered = 0
        self._heartbeats_dropped = 0
        self._heartbeat_sent_at: float | None = None
        self._heartbeats_failing = False
        self._connection = connection_of(bootstrap_servers, "publisher")
        self._bootstrap_servers = self._connection.bootstrap_servers
        self._topic = topic
        self._gateway_id = gateway_id
        self._delivery_timeout_s = delivery_timeout_s
        self._max_pending = max_pending
        self._on_undeliverable = on_undeliverable
        self._monotonic_ns = monotonic_ns
        self._wall_clock_ns = wall_clock_ns
        if "partitioner" in producer_options:
            raise ValueError(
                "partitioner: the publisher places each connection's events itself, by its id "
                "as Kafka's default partitioner does (producer/lanes.py)"
            )
        self._producer_options: dict[str, Any] = {
            "linger_ms": linger_ms,
            "max_batch_size": DEFAULT_MAX_BATCH_BYTES,
            # aiokafka uses it for metadata waits, full-buffer waits and produce requests.
            "request_timeout_ms": max(1, int(delivery_timeout_s * 1000)),
            **producer_options,
            # Not overridable: these are what make per-connection order and no-duplicates hold.
            "acks": "all",
            "enable_idempotence": True,
        }
        self._coalescer = ActivityCoalescer(int(activity_interval_s * 1_000_000_000))
        self._producer: Any = None
        self._running = False
        self._accepting = False
        # Replacing the producer after a delivery failed (see _replace_producer). Meanwhile
        # events wait here, in the order they were handed in, each with the future flush() and
        # stop() see in _in_flight.
        self._replacer: asyncio.Task[None] | None = None
        self._failed_while_replacing = False
        self._parked: deque[tuple[Event, bytes, asyncio.Future[Any]]] = deque()
        self._lifecycle = asyncio.Lock()
        # Sends are ordered per partition (producer/lanes.py): an activity taken from the
        # coalescer and the Disconnected after it reach the producer in that order even when
        # other tasks publish concurrently, and a partition whose batch cannot be sent (its
        # leader is away) holds up only its own connections. Replaced by start(), which knows
        # the partition count.
        self._lanes = Lanes(1)
        # Events being handed to the producer (inside its send()): the spool is not left, and a
        # replaced producer not stopped, while one is.
        self._handing = 0
        self._handed = asyncio.Event()
        self._handed.set()
        self._room = asyncio.Semaphore(max_pending)
        self._in_flight: dict[asyncio.Future[Any], Event] = {}
        self._stopping = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._delivered = 0
        self._undelivered = 0
        self._coalesced = 0
        self._failures_since_check = 0
        self._first_failure: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._accepting

    def stats(self) -> PublisherStats:
        return PublisherStats(
            delivered=self._delivered,
            undelivered=self._undelivered,
            in_flight=len(self._in_flight),
            pending_activities=self._coalescer.pending,
            coalesced_activities=self._coalesced,
            heartbeats_delivered=self._heartbeats_delivered,
            heartbeats_dropped=self._heartbeats_dropped,
            spooled=self._spooled,
            replayed=self._replayed,
            spool_refused=self._spool_refused,
            spool_pending=0 if self._spool is None else self._spool.pending,
            spool_bytes=0 if self._spool is None else self._spool.size_bytes,
            spool_lost=0 if self._spool is None else self._spool.lost,
        )

    @property
    def node_id(self) -> str | None:
        """This gateway node's id (None: no node role)."""
        return self._node_id

    @property
    def incarnation(self) -> int | None:
        """The incarnation chosen by the latest start() (None: no node role, or never started).
        Kept after stop(); the next start() chooses a larger one."""
        return self._incarnation

    @property
    def undelivered(self) -> int:
        return self._undelivered

    async def start(self) -> None:
        """Connect (retrying until delivery_timeout_s) and check that the topic exists. With the
        node role, also choose a new incarnation and publish NodeStarted, acknowledged, within
        the same delivery_timeout_s; then start the heartbeats."""
        async with self._lifecycle:
            if self._running:
                return
            deadline = asyncio.get_running_loop().time() + self._delivery_timeout_s
            if self._spool is not None:
                await self._spool.open()  # a directory it cannot use is said before connecting
            try:
                self._producer = await self._connect(deadline=deadline)
            except BaseException:
                await self._close_spool()
                raise
            # Fixed for this run: a connection keeps its partition (and its order) even if the
            # topic gains partitions meanwhile.
            self._lanes = Lanes(kafka_producer.partition_count(self._producer, self._topic))
            if self._node_id is not None:
                try:
                    await self._announce_start(self._node_id, deadline)
                except BaseException:
                    producer, self._producer = self._producer, None
                    await self._abandon(producer, [])
                    await producer.stop()
                    await self._close_spool()
                    raise
            self._room = asyncio.Semaphore(self._max_pending)
            self._stopping = asyncio.Event()
            if self._spool is not None:
                # What a previous run left is delivered before anything new.
                self._spooling = self._spool.pending > 0
                if self._spooling:
                    log.info(
                        "the spool at %s holds %d event(s) from before; replaying them first",
                        self._spool.directory,
                        self._spool.pending,
                    )
                self._replayer = asyncio.create_task(self._replay_spool())
            self._running = True
            self._accepting = True
            if self._coalescer.interval_ns > 0:
                self._flusher = asyncio.create_task(self._publish_due_activity())
            if self._node_id is not None:
                self._heartbeater = asyncio.create_task(self._publish_heartbeats())

    async def _connect(
        self, retry_log_level: int = logging.WARNING, deadline: float | None = None
    ) -> Any:
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._delivery_timeout_s
        return await kafka_producer.connect(
            self._connection,
            self._producer_options,
            self._topic,
            deadline=deadline,
            timeout_s=self._delivery_timeout_s,
            retry_log_level=retry_log_level,
        )

    async def stop(self) -> None:
        """Publish pending activity, wait up to delivery_timeout_s for acknowledgements, close.

        Events still unacknowledged then are counted and reported as undeliverable, and this
        raises UndeliveredEventsError (after closing) if anything failed since the last check."""
        async with self._lifecycle:
            if not self._running:
                return
            self._accepting = False
            self._stopping.set()
            if self._heartbeater is not None:
                self._heartbeater.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._heartbeater
                self._heartbeater = None
            if self._flusher is not None:
                await self._flusher
                self._flusher = None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._delivery_timeout_s
            try:
                # A failure here is already counted and reported; it is raised below, with
                # any others, as UndeliveredEventsError once the producer is closed.
                with contextlib.suppress(PublisherError):
                    pending = self._activity_events(self._coalescer.drain())
                    await self._send_in_lanes(pending, deadline)
                # A publish past the started check reserved its turn in the same step, so
                # every event handed in before stop() is handed over (or reported) by now;
                # one still waiting at the deadline finds the publisher closed.
                await self._lanes.settled(deadline - loop.time())
                await self._wait_in_flight(deadline)
                await self._wait_spool(deadline)
                await self._wait_heartbeat(deadline)
            finally:
                await self._stop_replayer()
                await self._close_producer()
                await self._close_spool()
                self._running = False
            self._raise_if_failures()

    close = stop

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.stop()
            return
        try:
            await self.stop()
        except PublisherError as err:
            # Do not hide the exception that ended the block; this one is logged and counted.
            log.error("while closing the publisher after %r: %s", exc, err)

    async def _close_producer(self) -> None:
        if self._replacer is not None:
            self._replacer.cancel()
            try:
                await self._replacer
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("replacing the Kafka producer failed")
            self._replacer = None
        producer, self._producer = self._producer, None
        if (
            self._in_flight
            or self._heartbeat_in_flight is not None
            or any(not f.done() for f in self._replay_futures)
        ):
            await self._abandon(producer, list(self._in_flight))
            self._heartbeat_in_flight = None
        self._parked.clear()
        if producer is not None:
            await producer.stop()

    async def _abandon(self, producer: Any, futures: list[asyncio.Future[Any]]) -> None:
        """Report these in-flight events as not acknowledged in time, failing what the producer
        still holds of them."""
        # Stop its sender and fail what it still holds (kafka_producer.fail_held says why), so
        # those events are reported.
        error = DeliveryTimeoutError(
            f"not acknowledged within {self._delivery_timeout_s:g} s; the broker may still "
            "have received it"
        )
        if futures:
            self._degrade()  # before any of them is taken out of _in_flight: keeps their order
        await kafka_producer.fail_held(producer, error)
        for future in futures:
            event = self._in_flight.pop(future, None)
            if event is None:
                continue
            self._room.release()
            cause = future.exception() if future.done() and not future.cancelled() else None
            # Its outcome is reported here; a parked future must not be settled again later.
            future.cancel()
            self._report(event, cause or error)

    # -- publishing --------------------------------------------------------------------------

    def _require_accepting(self) -> None:
        if not self._accepting:
            raise PublisherClosedError("Publisher is not started (or is stopping)")

    def _event(self, connection_id: str, payload: Payload, at_ns: int | None) -> Event:
        return Event(
            event_id=str(uuid.uuid4()),
            connection_id=connection_id,
            gateway_id=self._gateway_id,
            occurred_at_ns=self._wall_clock_ns() if at_ns is None else at_ns,
            payload=payload,
        )

    def _activity_events(self, activities: Iterable[CoalescedActivity]) -> list[Event]:
        return [
            self._event(a.connection_id, Activity(a.frames), a.latest_at_ns) for a in activities
        ]

    async def publish(self, event: Event) -> None:
        """Hand one ready-made event to the producer; delivery completes in the background (see
        flush). The event is validated as the projector would (InvalidEvent if it would be
        dead-lettered). Coalesced activity of its connection is published before it."""
        self._require_accepting()
        if isinstance(event.payload, NodeStarted | NodeHeartbeat):
            raise InvalidEvent("a node's own events are published by its node role, not publish()")
        value = checked_value(event)
        deadline = asyncio.get_running_loop().time() + self._delivery_timeout_s
        lane = self._lanes.lane_of(event.connection_id)
        # The turn and the connection's pending activity are taken in one step, with no await
        # since the started check: this call's place in its connection's order is fixed here.
        pending = self._coalescer.take(event.connection_id)
        ticket = self._lanes.reserve(lane)
        if pending is None:
            await self._send_in_turn(lane, ticket, [event], deadline, value)
        else:
            await self._send_in_turn(
                lane, ticket, [*self._activity_events([pending]), event], deadline, taken=1
            )

    async def connected(
        self, connection_id: str, source_ip: str, user_agent: str, *, at_ns: int | None = None
    ) -> Event:
        """Publish a Connected event; with the node role it carries node_id and incarnation."""
        if self._node_id is not None and self._incarnation is not None:
            payload = Connected(source_ip, user_agent, self._node_id, self._incarnation)
        else:
            payload = Connected(source_ip, user_agent)
        event = self._event(connection_id, payload, at_ns)
        await self.publish(event)
        return event

    async def activity(
        self, connection_id: str, *, frames: int = 1, at_ns: int | None = None
    ) -> Event | None:
        """Record activity on a connection. Returns the Activity event if one was published now,
        None if this call was merged into one that goes out when the interval ends (or before
        the connection's next event, or on flush/stop). Cheap when merged: no I/O."""
        self._require_accepting()
        at = self._wall_clock_ns() if at_ns is None else at_ns
        checked: Event | None = None
        value: bytes | None = None
        if connection_id in self._coalescer:
            # Its id passed the whole check when its interval opened (below); a merged call
            # brings only frames and a time, checked by the same rules, and stays cheap.
            check_frames(frames)
            check_time(at)
        else:
            checked = self._event(connection_id, Activity(frames), at)
            value = checked_value(checked)
        ready = self._coalescer.record(connection_id, at, frames, self._monotonic_ns())
        if ready is None:
            self._coalesced += 1
            return None
        if checked is not None and (ready.latest_at_ns, ready.frames) == (at, frames):
            event = checked
        else:
            (event,) = self._activity_events([ready])
            value = None
        # No await between record() and reserving the turn, so this event is ordered before any
        # event of the connection handed in after this call.
        lane = self._lanes.lane_of(connection_id)
        ticket = self._lanes.reserve(lane)
        await self._send_in_turn(
            lane,
            ticket,
            [event],
            asyncio.get_running_loop().time() + self._delivery_timeout_s,
            value,
        )
        return event

    async def disconnected(
        self,
        connection_id: str,
        *,
        status_code: int = 1000,
        reason: str = "",
        at_ns: int | None = None,
    ) -> Event:
        """Publish the connection's pending activity, then its Disconnected."""
        event = self._event(connection_id, Disconnected(status_code, reason), at_ns)
        await self.publish(event)
        return event

    async def flush(self) -> None:
        """Publish all coalesced activity now and wait until every event handed in so far is
        acknowledged. Raises DeliveryTimeoutError if some are still unacknowledged after
        delivery_timeout_s (they stay in flight), UndeliveredEventsError if any failed since
        the last flush."""
        self._require_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._delivery_timeout_s
        await self._send_in_lanes(self._activity_events(self._coalescer.drain()), deadline)
        # Events handed in before this call and still waiting for their turn are in flight after.
        await self._lanes.settled(deadline - loop.time())
        if self._spool is not None and self._spool.is_open:
            await self._spool.durable()  # what is spooled so far is on disk when this returns
        remaining = await self._wait_in_flight(deadline)
        if remaining:
            raise DeliveryTimeoutError(
                f"{remaining} event(s) not acknowledged within {self._delivery_timeout_s:g} s; "
                "they stay in flight until stop()"
            )
        if spooled := await self._wait_spool(deadline):
            raise DeliveryTimeoutError(
                f"{spooled} event(s) still in the spool after {self._delivery_timeout_s:g} s; "
                "they are on disk and are replayed when the broker takes them"
            )
        self._raise_if_failures()

    # -- the node role ------------------------------------------------------------------------

    def _node_event(self, payload: NodeStarted | NodeHeartbeat) -> Event:
        return Event(
            event_id=str(uuid.uuid4()),
            connection_id="",
            gateway_id=self._gateway_id,
            occurred_at_ns=self._wall_clock_ns(),
            payload=payload,
        )

    async def _announce_start(self, node_id: str, deadline: float) -> None:
        """Choose this start's incarnation and publish NodeStarted, waiting for the broker's
        acknowledgement: it is in the log before any Connected of this incarnation is sent."""
        self._incarnation = next_incarnation(node_id, self._wall_clock_ns())
        event = self._node_event(NodeStarted(node_id, self._incarnation))
        value = checked_value(event)
        try:
            async with asyncio.timeout_at(deadline):
                future = await self._producer.send(
                    self._topic, value=value, key=record_key(event), headers=list(HEADERS)
                )
                await future
        except (TimeoutError, KafkaTimeoutError) as exc:
            raise BrokerUnavailableError(
                f"the broker did not acknowledge NodeStarted of node {node_id} within "
                f"{self._delivery_timeout_s:g} s"
            ) from exc
        except KafkaError as exc:
            raise PublisherError(f"cannot publish NodeStarted of node {node_id}: {exc!r}") from exc

    async def _publish_heartbeats(self) -> None:
        """Background task (node role): one NodeHeartbeat every heartbeat_interval_s until
        stop() cancels it. A beat missed (the loop was busy) is not made up for."""
        loop = asyncio.get_running_loop()
        interval_s = self._heartbeat_interval_s
        next_at = loop.time() + interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += interval_s
            if next_at <= loop.time():
                next_at = loop.time() + interval_s
            try:
                # Handing it over may wait (metadata, a full batch) until the next one is due.
                await self._send_heartbeat(max(0.001, next_at - loop.time()))
            except Exception:
                log.exception("publishing a heartbeat failed")

    async def _send_heartbeat(self, timeout_s: float) -> None:
        """Hand one NodeHeartbeat straight to the producer, or drop it. Outside the lanes and
        max_pending: connection events neither wait for it nor make it wait for them."""
        assert self._node_id is not None
        assert self._incarnation is not None
        pending = self._heartbeat_in_flight
        # Normally settled long before: failed with its batch after delivery_timeout_s at most.
        # Never let one lost future silence the node.
        if (
            pending is not None
            and self._heartbeat_sent_at is not None
            and asyncio.get_running_loop().time() - self._heartbeat_sent_at
            > self._delivery_timeout_s + self._heartbeat_interval_s
        ):
            self._heartbeat_in_flight = pending = None
        producer = self._producer
        if producer is None or self._replacer is not None or pending is not None:
            # No producer to take it now, or the previous one is still unacknowledged: the
            # broker is slow or away, and a queued heartbeat would say nothing when it arrives.
            self._drop_heartbeat("the previous heartbeat is unacknowledged or no producer")
            return
        event = self._node_event(NodeHeartbeat(self._node_id, self._incarnation))
        try:
            value = checked_value(event)
            async with asyncio.timeout(timeout_s):
                future = await producer.send(
                    self._topic, value=value, key=record_key(event), headers=list(HEADERS)
                )
        except (InvalidEvent, TimeoutError, KafkaError) as exc:
            self._drop_heartbeat(repr(exc))
            return
        self._heartbeat_in_flight = future
        self._heartbeat_sent_at = asyncio.get_running_loop().time()
        future.add_done_callback(functools.partial(self._heartbeat_settled, producer))

    def _heartbeat_settled(self, producer: Any, future: asyncio.Future[Any]) -> None:
        if self._heartbeat_in_flight is future:
            self._heartbeat_in_flight = None
        if future.cancelled():
            self._drop_heartbeat("cancelled")
        elif (exc := future.exception()) is not None:
            self._drop_heartbeat(repr(exc))
            # Its failed batch leaves a sequence gap on its partition, which breaks the
            # producer for the connection events there too (see _replace_producer_soon).
            if producer is self._producer:
                self._replace_producer_soon()
        else:
            self._heartbeats_delivered += 1
            self._heartbeats_failing = False

    def _drop_heartbeat(self, why: str) -> None:
        self._heartbeats_dropped += 1
        # One warning per run of failures, not one per heartbeat.
        level = logging.DEBUG if self._heartbeats_failing else logging.WARNING
        self._heartbeats_failing = True
        log.log(level, "heartbeat of node %s dropped: %s", self._node_id, why)

    def _heartbeats(self) -> list[asyncio.Future[Any]]:
        return [] if self._heartbeat_in_flight is None else [self._heartbeat_in_flight]

    async def _wait_heartbeat(self, deadline: float) -> None:
        if heartbeats := self._heartbeats():
            timeout = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait(heartbeats, timeout=timeout)

    # -- internals ---------------------------------------------------------------------------

    async def _publish_due_activity(self) -> None:
        """Background task: publishes coalesced activity when its interval ends."""
        loop = asyncio.get_running_loop()
        interval_s = self._coalescer.interval_ns / 1e9
        while not self._stopping.is_set():
            next_ns = self._coalescer.next_deadline_ns()
            # A window opened after this point ends at least a whole interval from now.
            wait_s = (
                interval_s if next_ns is None else max(0.0, (next_ns - self._monotonic_ns()) / 1e9)
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait_s)
                return
            try:
                due = self._coalescer.due(self._monotonic_ns())
                if due:
                    await self._send_in_lanes(
                        self._activity_events(due), loop.time() + self._delivery_timeout_s
                    )
            except PublisherError:
                pass  # already counted and reported; the next interval tries again
            except Exception:
                log.exception("publishing coalesced activity failed")

    async def _send_in_lanes(self, events: list[Event], deadline: float) -> None:
        """Send events of any connections: a turn in each lane they need is reserved now, in
        this order, and the lanes' shares go out concurrently, so a lane that waits holds up
        only its own. Raises the first failure once all have been handled."""
        if not events:
            return
        shares: dict[int, list[Event]] = {}
        for event in events:
            shares.setdefault(self._lanes.lane_of(event.connection_id), []).append(event)
        turns = [(lane, self._lanes.reserve(lane), share) for lane, share in shares.items()]
        if len(turns) == 1:
            lane, ticket, share = turns[0]
            await self._send_in_turn(lane, ticket, share, deadline, taken=len(share))
            return
        outcomes = await asyncio.gather(
            *(
                self._send_in_turn(lane, ticket, share, deadline, taken=len(share))
                for lane, ticket, share in turns
            ),
            return_exceptions=True,
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        for error in errors:
            if not isinstance(error, PublisherError):
                raise error
        if errors:
            raise errors[0]

    async def _send_in_turn(
        self,
        lane: int,
        ticket: Ticket,
        events: list[Event],
        deadline: float,
        value: bytes | None = None,
        *,
        taken: int = 0,
    ) -> None:
        """Wait for the reserved turn, send the events (value: the last one's encoding, if
        made), end the turn. The first `taken` events were taken from the coalescer, not handed
        in by the caller: if the wait is cancelled they are reported (the spool keeps them)."""
        try:
            await self._lanes.acquire(lane, ticket)
        except BaseException as exc:
            for event in events[:taken]:
                self._report(event, exc)
            raise
        try:
            if len(events) == 1:
                await self._send(events[0], deadline, lane, value)
            else:
                await self._send_all(events, deadline, lane)
        finally:
            self._lanes.release(lane)

    async def _send_all(self, events: list[Event], deadline: float, lane: int) -> None:
        """Send each event (all of one lane, whose turn the caller holds); after the deadline
        the rest are reported without trying. Raises the first failure once all have been
        handled."""
        first: PublisherError | None = None
        for event in events:
            if first is not None and asyncio.get_running_loop().time() >= deadline:
                self._report(event, first)
                continue
            try:
                await self._send(event, deadline, lane)
            except PublisherError as exc:
                first = first or exc
        if first is not None:
            raise first

    async def _send(
        self, event: Event, deadline: float, lane: int, value: bytes | None = None
    ) -> None:
        """Hand one event (and its encoding, if already made) to the producer; the caller holds
        the turn of its lane (its partition). Waits for room while max_pending events are
        unacknowledged; reports and raises on failure. While the producer is being replaced,
        the event waits in _parked."""
        if self._producer is None and self._replacer is None:
            closed = PublisherClosedError("Publisher was stopped before the event could be sent")
            self._report(event, closed)
            raise closed
        if self._spool is not None and (self._spooling or self._replacer is not None):
            self._to_spool(event, encode(event) if value is None else value)
            return
        acquired = False
        try:
            if self._room.locked():
                async with asyncio.timeout_at(deadline):
                    await self._room.acquire()
            else:
                await self._room.acquire()  # returns at once; skips the timer's cost
            acquired = True
            if self._replacer is not None:
                parked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                self._parked.append((event, encode(event) if value is None else value, parked))
                self._in_flight[parked] = event
                parked.add_done_callback(self._settle)
                return
            # aiokafka bounds its own waits (metadata, a full batch) by request_timeout_ms,
            # which is delivery_timeout_s, and raises KafkaTimeoutError after it.
            self._handing += 1
            self._handed.clear()
            try:
                future = await self._producer.send(
                    self._topic,
                    value=encode(event) if value is None else value,
                    key=event.connection_id.encode(),
                    partition=lane,
                    headers=list(HEADERS),
                )
            finally:
                self._handing -= 1
                if not self._handing:
                    self._handed.set()
        except (TimeoutError, KafkaTimeoutError) as exc:
            if acquired:
                self._room.release()
            error: PublisherError = BrokerUnavailableError(
                f"the broker did not take event {event.event_id} within "
                f"{self._delivery_timeout_s:g} s ({len(self._in_flight)} events unacknowledged)"
            )
            if self._report(event, error):
                return  # in the spool
            raise error from exc
        except KafkaError as exc:
            if acquired:
                self._room.release()
            error = PublisherError(f"cannot publish event {event.event_id}: {exc!r}")
            if self._report(event, error):
                return
            raise error from exc
        except BaseException as exc:
            if acquired:
                self._room.release()
            self._report(event, exc)
            raise
        self._in_flight[future] = event
        future.add_done_callback(self._settle)
        if self._spooling:
            # The switch came while this one was being handed over (waiting for room or for
            # the producer): it belongs in the spool before any later event, as if in flight.
            self._keep_in_spool(event)

    def _settle(self, future: asyncio.Future[Any]) -> None:
        if future in self._in_flight and (future.cancelled() or future.exception() is not None):
            self._degrade()  # while this event is still among the in-flight ones, in order
        event = self._in_flight.pop(future, None)
        if event is None:
            return  # already reported when the producer was closed
        self._room.release()
        if future.cancelled():
            self._report(event, DeliveryTimeoutError("delivery was cancelled"))
        elif (exc := future.exception()) is not None:
            self._report(event, exc)
            self._replace_producer_soon()
        else:
            self._delivered += 1
            if self._spooled_ids and event.event_id in self._spooled_ids:
                self._spooled_ids.discard(event.event_id)
                self._skip_replay.add(event.event_id)
            self._unspooled_ids.discard(event.event_id)

    # -- replacing the producer --------------------------------------------------------------

    def _replace_producer_soon(self) -> None:
        """A batch failed: from now on events wait for a fresh producer.

        aiokafka's idempotent producer numbers each partition's batches when it drains them
        and never takes a number back. A batch it fails (one whose partition had no leader for
        delivery_timeout_s, in message_accumulator.py drain_by_nodes, or one the broker
        refused) leaves a gap the broker will not accept: every later batch of that partition
        is refused with OutOfOrderSequenceNumber, for as long as the producer lives. The Java
        client resets its producer id in this case; aiokafka has no way to, so a new producer
        (a new producer id, sequences from 0) takes over."""
        if not self._accepting:
            return  # stopping: stop() reports whatever does not arrive
        self._degrade()
        if self._replacer is not None:
            self._failed_while_replacing = True
        elif self._producer is not None:
            self._replacer = asyncio.create_task(self._replace_producer())

    async def _replace_producer(self) -> None:
        """Retire the failed producer, connect a new one (retrying until the broker answers),
        hand it the events that waited, in order, and let new events go straight to it again.

        A connection's events are never on two producers at once: the new producer sends
        nothing before every event of the old one is settled (acknowledged, failed, or given
        up after delivery_timeout_s and reported), so what is delivered keeps its order."""
        old = self._producer
        while True:
            await self._retire(old)
            self._producer = None
            new = await self._reconnect()
            self._producer = new  # stop() closes it if this task is cancelled from here on
            # Failures until now were the old producer's; one from here on is the new one's.
            self._failed_while_replacing = False
            while self._parked:
                event, value, parked = self._parked.popleft()
                try:
                    sent = await new.send(
                        self._topic,
                        value=value,
                        key=event.connection_id.encode(),
                        partition=self._lanes.lane_of(event.connection_id),
                        headers=list(HEADERS),
                    )
                except Exception as exc:
                    if not parked.done():
                        parked.set_exception(exc)
                else:
                    sent.add_done_callback(functools.partial(_pass_on, parked))
            if not self._failed_while_replacing:
                break
            old = new
        self._replacer = None
        log.info("a new Kafka producer took over after a failed delivery")

    async def _retire(self, producer: Any) -> None:
        """Give the producer's events up to delivery_timeout_s to settle, then stop it; what is
        still unacknowledged is reported."""
        if producer is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._delivery_timeout_s
        # An event still being handed to it (its partition's batch was full) joins the others
        # in flight once handed over; none starts now that it is being replaced.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._handed.wait()
        # A heartbeat it holds would keep its stop() waiting while the broker is away: wait for
        # it too, and fail it with the rest at the deadline.
        while carried := (
            self._carried() + self._heartbeats() + [f for f in self._replay_futures if not f.done()]
        ):
            # A send that was under way when the replacement began may add one more: look again.
            await asyncio.wait(carried, timeout=max(0.0, deadline - loop.time()))
            if loop.time() >= deadline:
                await self._abandon(producer, self._carried())
                break
        try:
            await producer.stop()
        except Exception:
            # Its events are all settled or reported; a connection that does not close cleanly
            # must not keep the new producer from taking over.
            log.exception("closing the replaced Kafka producer failed")

    def _carried(self) -> list[asyncio.Future[Any]]:
        """In-flight events already handed to a producer (not waiting in _parked)."""
        waiting = {parked for _, _, parked in self._parked}
        return [f for f in self._in_flight if f not in waiting]

    async def _reconnect(self) -> Any:
        """A started producer. Retries until it gets one (stop() cancels): the events waiting
        for it are bounded by max_pending, and flush() and stop() bound every wait for them."""
        while True:
            try:
                # One warning per delivery_timeout_s of outage, not one per attempt.
                return await self._connect(retry_log_level=logging.DEBUG)
            except Exception as exc:
                log.warning("no new Kafka producer yet, retrying: %r", exc)
                await asyncio.sleep(kafka_producer.CONNECT_BACKOFF_S)

    async def _wait_in_flight(self, deadline: float) -> int:
        """Wait until everything in flight is settled or the deadline passes; how many remain."""
        futures = list(self._in_flight)
        if futures:
            timeout = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait(futures, timeout=timeout)
        return sum(1 for f in futures if f in self._in_flight)

    def _report(self, event: Event, error: BaseException) -> bool:
        """An event was not delivered: with the spool, keep it there (True); otherwise, or if
        the spool refuses it, count and report it (False)."""
        if self._spool is not None and self._spool.is_open:
            self._degrade()
            if event.event_id in self._spooled_ids:
                self._spooled_ids.discard(event.event_id)
                return True
            if event.event_id in self._unspooled_ids:
                self._unspooled_ids.discard(event.event_id)
            elif self._spool_put(event, encode(event)):
                return True
        self._report_undelivered(event, error)
        return False

    def _report_undelivered(self, event: Event, error: BaseException) -> None:
        self._undelivered += 1
        self._failures_since_check += 1
        if self._first_failure is None:
            self._first_failure = error
            log.warning(
                "event %s (%s of connection %s) not delivered: %r",
                event.event_id,
                event.kind,
                event.connection_id,
                error,
            )
        if self._on_undeliverable is not None:
            try:
                self._on_undeliverable(event, error)
            except Exception:
                log.exception("on_undeliverable raised for event %s", event.event_id)

    def _raise_if_failures(self) -> None:
        if self._failures_since_check:
            count, first = self._failures_since_check, self._first_failure
            self._failures_since_check, self._first_failure = 0, None
            assert first is not None
            raise UndeliveredEventsError(count, first)

    # -- the durable spool ---------------------------------------------------------------------

    def _degrade(self) -> None:
        """From now on new events go to the spool. The events in flight go there first, in the
        order they were handed in: one that fails later is already in its place, so events of
        a connection handed in after it cannot get ahead of it."""
        spool = self._spool
        if spool is None or self._spooling or not spool.is_open:
            return
        self._spooling = True
        for future, event in self._in_flight.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                continue  # acknowledged; its callback has not run yet
            self._keep_in_spool(event)

    def _keep_in_spool(self, event: Event) -> None:
        """Spool an in-flight event in its place; a failure of it is then not reported."""
        if self._spool_put(event, encode(event)):
            self._spooled_ids.add(event.event_id)
        else:
            self._unspooled_ids.add(event.event_id)

    def _to_spool(self, event: Event, value: bytes) -> None:
        """Put a new event in the spool, or report it and raise SpoolFullError."""
        if self._spool_put(event, value):
            return
        assert self._spool is not None
        error = SpoolFullError(
            f"the broker is not taking events and the spool at {self._spool.directory} is full "
            f"({self._spool.size_bytes} of {self._spool.max_bytes} bytes): event "
            f"{event.event_id} was refused"
        )
        self._report_undelivered(event, error)
        raise error

    def _spool_put(self, event: Event, value: bytes) -> bool:
        assert self._spool is not None
        if self._spool.put(value):
            self._spooled += 1
            self._spool_refusing = False
            return True
        self._spool_refused += 1
        if not self._spool_refusing:  # one warning per run of refusals; all are counted
            self._spool_refusing = True
            log.warning(
                "the spool at %s is full (%d bytes): event %s and any more are refused until "
                "the broker takes the spooled ones (counted in spool_refused)",
                self._spool.directory,
                self._spool.max_bytes,
                event.event_id,
            )
        return False

    async def _replay_spool(self) -> None:
        """Background task: deliver the spool, in order, whenever a producer can take it; once it
        is empty, let new events go straight to the broker again."""
        spool = self._spool
        assert spool is not None
        failing = False
        while True:
            try:
                failing = await self._replay_round(spool, failing)
            except Exception:
                # Never let the spool stop draining: say why, and try again.
                log.exception("replaying the spool failed unexpectedly; retrying")
                with contextlib.suppress(Exception):
                    await spool.rewind()
                failing = True
                await asyncio.sleep(_REPLAY_RETRY_S)

    async def _replay_round(self, spool: Spool, failing: bool) -> bool:
        """One step of _replay_spool; returns whether replaying is failing now."""
        self._watch_in_flight()
        if spool.pending == 0:
            if (
                self._spooling
                and self._replacer is None
                and self._producer is not None
                and not self._handing
            ):
                # No await from the checks to the switch, and no event is being handed to the
                # producer (one that was would belong in the spool, behind what it held).
                self._spooling = False
                self._skip_replay.clear()
                log.info("the spool is delivered; events go to the broker again")
            await asyncio.sleep(_REPLAY_RETRY_S / 5)
            return failing
        producer = self._producer
        if producer is None or self._replacer is not None:
            await asyncio.sleep(_REPLAY_RETRY_S)
            return failing
        if spool.unread == 0:
            await spool.durable()
        batch = await spool.read(_REPLAY_BATCH)
        if not batch:
            await asyncio.sleep(_REPLAY_RETRY_S / 5)
            return failing
        delivered, skipped = await self._replay_batch(producer, batch)
        if delivered is not None:
            await spool.ack(batch[-1][0])
            self._replayed += delivered
            self._skip_replay.difference_update(skipped)
            if failing:
                log.info("the spool is being delivered again")
            return False
        await spool.rewind()
        if not failing:
            log.warning(
                "replaying the spool failed; %d event(s) wait in it, retrying", spool.pending
            )
        if producer is self._producer:
            self._replace_producer_soon()  # its failed batch broke its sequence numbers
        await asyncio.sleep(_REPLAY_RETRY_S)
        return True

    def _watch_in_flight(self) -> None:
        """With the spool, an event unacknowledged for delivery_timeout_s counts as failed.

        aiokafka fails a batch only when its partition has had no leader that long. A broker
        that stops while the producer is idle leaves it believing the old leader (its metadata
        requests fail, so nothing updates it), and it retries the batch forever: no failure would
        ever send the events to the spool. The oldest in-flight event is the first in
        _in_flight; one that stays the oldest for delivery_timeout_s was sent at least that long
        ago."""
        if self._spooling or self._replacer is not None or not self._in_flight:
            self._oldest = None
            return
        oldest = next(iter(self._in_flight))
        now = asyncio.get_running_loop().time()
        if self._oldest is None or self._oldest[0] is not oldest:
            self._oldest = (oldest, now)
        elif now - self._oldest[1] >= self._delivery_timeout_s:
            self._oldest = None
            log.warning(
                "%d event(s) unacknowledged for %g s: the broker is away; they and the events "
                "after them go to the spool at %s",
                len(self._in_flight),
                self._delivery_timeout_s,
                None if self._spool is None else self._spool.directory,
            )
            self._replace_producer_soon()

    async def _replay_batch(
        self, producer: Any, batch: list[tuple[int, bytes]]
    ) -> tuple[int | None, list[str]]:
        """Send one round of spooled records and wait for all of them: (how many the broker
        acknowledged, the ids skipped), or (None, ...) if any failed."""
        skipped: list[str] = []
        futures: list[asyncio.Future[Any]] = []
        self._replay_futures = futures
        try:
            for _, value in batch:
                try:
                    event_id, connection_id, *_ = decode_tuple(value)
                except InvalidEvent as exc:  # cannot happen for what the publisher wrote
                    log.error("a spooled record is not an event, skipped: %s", exc)
                    continue
                if event_id in self._skip_replay:
                    skipped.append(event_id)
                    continue
                futures.append(
                    await producer.send(
                        self._topic,
                        value=value,
                        key=connection_id.encode(),
                        partition=self._lanes.lane_of(connection_id),
                        headers=list(HEADERS),
                    )
                )
            if futures:
                done, waiting = await asyncio.wait(futures, timeout=self._delivery_timeout_s)
                if waiting or any(f.cancelled() or f.exception() is not None for f in done):
                    return None, skipped
        except KafkaError as exc:
            log.debug("replaying the spool: %r", exc)
            return None, skipped
        finally:
            self._replay_futures = []
        return len(futures), skipped

    async def _wait_spool(self, deadline: float) -> int:
        """Wait until the spool is delivered or the deadline passes; how many events remain."""
        spool = self._spool
        if spool is None or not spool.is_open:
            return 0
        loop = asyncio.get_running_loop()
        await spool.durable()
        # A poll: the count falls with acks made in a worker thread; 20 ms is cheap and short.
        while spool.pending and loop.time() < deadline and self._replayer is not None:  # noqa: ASYNC110
            await asyncio.sleep(min(0.02, max(0.0, deadline - loop.time())))
        return spool.pending

    async def _stop_replayer(self) -> None:
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
            self._replayer = None

    async def _close_spool(self) -> None:
        spool = self._spool
        if spool is None or not spool.is_open:
            return
        await spool.close()
        self._spooling = False
        self._spooled_ids.clear()
        self._unspooled_ids.clear()
        self._skip_replay.clear()
        if spool.pending:
            log.warning(
                "%d event(s) stay in the spool at %s; the next start replays them",
                spool.pending,
                spool.directory,
            )


def _pass_on(parked: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
    """Settle a parked event's future as the producer settled its record."""
    if parked.done():
        return  # already reported (stop() gave up on it)
    if done.cancelled():
        parked.cancel()
    elif (exc := done.exception()) is not None:
        parked.set_exception(exc)
    else:
        parked.set_result(done.result())
