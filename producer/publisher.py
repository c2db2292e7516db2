"""The publisher gateway nodes use: one call per connection event, safe and cheap.

Each event gets a fresh UUID event id and the gateway's clock in nanoseconds; the record key is
the connection id, so one connection's events land on one partition in order. The producer is
idempotent with acks from all in-sync replicas, so broker retries never duplicate or reorder.

A facade over parts that each own their state:
- validation.py: the one check every event goes through (what the projector would refuse is
  refused here, InvalidEvent);
- activity.py with coalescing.py: activity merged per connection, at most one Activity per
  `activity_interval_s`, flushed before the connection's Disconnected and on flush()/stop();
- handover.py with lanes.py and ledger.py: events handed over in order per partition, bounded
  by `max_pending`, each either acknowledged, kept by the spool, or reported exactly once
  (outcomes.py) while the call that handed it in, or the next flush()/stop(), raises;
- replacement.py: after a failed delivery a fresh producer takes over, so one failure never
  stops the events after it;
- spooling.py (spool_dir=...): events the broker cannot take go to a durable spool and are
  replayed in order;
- node_role.py (node_id=...): NodeStarted at start, then heartbeats;
- kafka_producer.py: the aiokafka producer, and the only code that knows its internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from conntrack.core.events import (
    MIN_TIME_NS,
    NODE_PAYLOADS,
    Cause,
    Connected,
    Disconnected,
    Event,
    InvalidEvent,
    NodeStarted,
    Payload,
)
from conntrack.core.kafka import KafkaConnection, connection_of
from conntrack.core.labels import normalized
from conntrack.core.settings import default
from conntrack.producer import kafka_producer
from conntrack.producer.activity import ActivityPublishing
from conntrack.producer.errors import (
    BrokerUnavailableError,
    DeliveryTimeoutError,
    PublisherClosedError,
    PublisherError,
)
from conntrack.producer.handover import Handover
from conntrack.producer.lanes import Lanes
from conntrack.producer.ledger import Future, Ledger
from conntrack.producer.node_role import NodeRole
from conntrack.producer.outcomes import Outcomes, PublisherStats, UndeliverableCallback
from conntrack.producer.replacement import ProducerSlot
from conntrack.producer.spool import Spool
from conntrack.producer.spooling import Spooling
from conntrack.producer.validation import check_id, checked_value

# How often new_incarnation() looks whether a producer is there again.
_PRODUCER_WAIT_S = 0.05

log = logging.getLogger(__name__)

__all__ = ["Publisher", "PublisherStats", "UndeliverableCallback"]


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
    node_id: take the node role (node_role.py; docs/producer.md, "The node role"): this gateway
        node's id, 1..255 characters, no NUL. None: no node role.
    heartbeat_interval_s: how often the node role publishes NodeHeartbeat; keep it well below
        the readers' lease (CONNTRACK_NODE_LEASE_SECONDS).
    spool_dir: a directory for the durable spool (spooling.py); None: no spool, events that
        cannot be delivered are reported. One Publisher per directory.
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
        self._connection = connection_of(bootstrap_servers, "publisher")
        self._topic = topic
        self._gateway_id = gateway_id
        self._delivery_timeout_s = delivery_timeout_s
        self._monotonic_ns = monotonic_ns
        self._wall_clock_ns = wall_clock_ns
        self._producer_options = kafka_producer.options(
            linger_ms, delivery_timeout_s, producer_options
        )
        self._outcomes = Outcomes(on_undeliverable)
        self._ledger = Ledger(max_pending)
        self._spooling = (
            None
            if spool_dir is None
            else Spooling(
                Spool(spool_dir, spool_max_bytes),
                ledger=self._ledger,
                outcomes=self._outcomes,
                topic=topic,
                partition_of=self._partition_of,
                delivery_timeout_s=delivery_timeout_s,
            )
        )
        self._handover = Handover(
            ledger=self._ledger,
            outcomes=self._outcomes,
            spooling=self._spooling,
            topic=topic,
            delivery_timeout_s=delivery_timeout_s,
        )
        self._node = (
            None
            if node_id is None
            else NodeRole(
                node_id,
                gateway_id,
                topic,
                heartbeat_interval_s=heartbeat_interval_s,
                delivery_timeout_s=delivery_timeout_s,
                wall_clock_ns=wall_clock_ns,
            )
        )
        self._slot = ProducerSlot(
            connect=self._connect,
            ledger=self._ledger,
            topic=topic,
            partition_of=self._partition_of,
            delivery_timeout_s=delivery_timeout_s,
            accepting=lambda: self._accepting,
            degrade=self._handover.degrade,
            also_carried=self._also_carried,
            abandon=self._handover.abandon,
        )
        self._handover.attach(self._slot)
        self._activity = ActivityPublishing(
            activity_interval_s,
            handover=self._handover,
            make_event=self._event,
            monotonic_ns=monotonic_ns,
            wall_clock_ns=wall_clock_ns,
            delivery_timeout_s=delivery_timeout_s,
        )
        self._running = False
        self._accepting = False
        self._lifecycle = asyncio.Lock()

    def _partition_of(self, connection_id: str) -> int:
        return self._handover.partition_of(connection_id)

    def _also_carried(self) -> list[Future]:
        heartbeats = [] if self._node is None else self._node.pending()
        replaying = [] if self._spooling is None else self._spooling.replay_in_flight()
        return heartbeats + replaying

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

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._accepting

    def stats(self) -> PublisherStats:
        node, spooling = self._node, self._spooling
        spool = None if spooling is None else spooling.spool
        return PublisherStats(
            delivered=self._outcomes.delivered,
            undelivered=self._outcomes.undelivered,
            in_flight=len(self._ledger),
            pending_activities=self._activity.pending,
            coalesced_activities=self._activity.coalesced,
            heartbeats_delivered=0 if node is None else node.delivered,
            heartbeats_dropped=0 if node is None else node.dropped,
            spooled=0 if spooling is None else spooling.spooled,
            replayed=0 if spooling is None else spooling.replayed,
            spool_refused=0 if spooling is None else spooling.refused,
            spool_pending=0 if spool is None else spool.pending,
            spool_bytes=0 if spool is None else spool.size_bytes,
            spool_max_bytes=0 if spool is None else spool.max_bytes,
            spool_lost=0 if spool is None else spool.lost,
            delivery_latency=self._outcomes.delivery.snapshot(),
        )

    @property
    def node_id(self) -> str | None:
        """This gateway node's id (None: no node role)."""
        return None if self._node is None else self._node.node_id

    @property
    def incarnation(self) -> int | None:
        """The incarnation chosen by the latest start() (None: no node role, or never started).
        Kept after stop(); the next start() chooses a larger one."""
        return None if self._node is None else self._node.incarnation

    @property
    def undelivered(self) -> int:
        return self._outcomes.undelivered

    async def start(self) -> None:
        """Connect (retrying until delivery_timeout_s) and check that the topic exists. With the
        node role, also choose a new incarnation and publish NodeStarted, acknowledged, within
        the same delivery_timeout_s; then start the heartbeats."""
        async with self._lifecycle:
            if self._running:
                return
            deadline = asyncio.get_running_loop().time() + self._delivery_timeout_s
            if self._spooling is not None:
                await self._spooling.open()  # a directory it cannot use is said first
            try:
                producer = await self._connect(deadline=deadline)
                # Fixed for this run: a connection keeps its partition (and its order) even if
                # the topic gains partitions meanwhile.
                self._handover.lanes = Lanes(kafka_producer.partition_count(producer, self._topic))
                if self._node is not None:
                    try:
                        await self._node.announce_start(producer, deadline)
                    except BaseException:
                        await self._handover.abandon(producer, [])
                        await producer.stop()
                        raise
            except BaseException:
                await self._close_spool()
                raise
            self._slot.producer = producer
            self._ledger.reset_room()
            if self._spooling is not None:
                self._spooling.start(self._slot)
            self._running = True
            self._accepting = True
            self._activity.start()
            if self._node is not None:
                self._node.start(self._slot)

    async def new_incarnation(self) -> int:
        """With the node role, while running: choose a new incarnation and publish its
        NodeStarted, acknowledged within delivery_timeout_s (the node learnt that its
        incarnation was fenced: docs/lifecycle.md). Connected events handed in from the choice
        on carry the new one. Returns it."""
        async with self._lifecycle:
            self._require_accepting()
            if self._node is None:
                raise PublisherError("new_incarnation() needs the node role (node_id=...)")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._delivery_timeout_s
            # A producer being replaced (after a failed delivery, as when the node was paused)
            # is waited for, within the same deadline.
            while (producer := self._slot.producer) is None or self._slot.replacing:
                if loop.time() >= deadline:
                    raise BrokerUnavailableError(
                        f"no producer to publish NodeStarted with within "
                        f"{self._delivery_timeout_s:g} s"
                    )
                await asyncio.sleep(_PRODUCER_WAIT_S)
            await self._node.announce_start(producer, deadline)
            assert self._node.incarnation is not None
            return self._node.incarnation

    async def stop(self) -> None:
        """Publish pending activity, wait up to delivery_timeout_s for acknowledgements, close.

        Events still unacknowledged then are counted and reported as undeliverable, and this
        raises UndeliveredEventsError (after closing) if anything failed since the last check."""
        async with self._lifecycle:
            if not self._running:
                return
            self._accepting = False
            if self._node is not None:
                await self._node.stop()
            await self._activity.stop()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._delivery_timeout_s
            try:
                # A failure here is already counted and reported; it is raised below, with
                # any others, as UndeliveredEventsError once the producer is closed.
                with contextlib.suppress(PublisherError):
                    await self._handover.send_in_lanes(self._activity.drain(), deadline)
                # A publish past the started check reserved its turn in the same step, so
                # every event handed in before stop() is handed over (or reported) by now;
                # one still waiting at the deadline finds the publisher closed.
                await self._handover.lanes.settled(deadline - loop.time())
                await self._ledger.wait(deadline)
                if self._spooling is not None:
                    await self._spooling.wait(deadline)
                if self._node is not None:
                    await self._node.wait(deadline)
            finally:
                if self._spooling is not None:
                    await self._spooling.stop_replayer()
                await self._close_producer()
                await self._close_spool()
                self._running = False
            self._outcomes.raise_if_failures()

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
        producer = await self._slot.take()
        if self._ledger or self._also_carried():
            await self._handover.abandon(producer, self._ledger.futures())
            if self._node is not None:
                self._node.forget()
        self._ledger.clear_parked()
        if producer is not None:
            await producer.stop()

    async def _close_spool(self) -> None:
        if self._spooling is not None:
            await self._spooling.close()

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

    async def publish(self, event: Event) -> None:
        """Hand one ready-made event to the producer; delivery completes in the background (see
        flush). The event is validated as the projector would (InvalidEvent if it would be
        dead-lettered). Coalesced activity of its connection is published before it."""
        self._require_accepting()
        if isinstance(event.payload, NODE_PAYLOADS):
            raise InvalidEvent("a node's own events are published by its node role, not publish()")
        value = checked_value(event)
        deadline = asyncio.get_running_loop().time() + self._delivery_timeout_s
        lanes = self._handover.lanes
        lane = lanes.lane_of(event.connection_id)
        # The turn and the connection's pending activity are taken in one step, with no await
        # since the started check: this call's place in its connection's order is fixed here.
        pending = self._activity.take(event.connection_id)
        ticket = lanes.reserve(lane)
        if pending is None:
            await self._handover.send_in_turn(lane, ticket, [event], deadline, value)
        else:
            await self._handover.send_in_turn(lane, ticket, [pending, event], deadline, taken=1)

    async def connected(
        self,
        connection_id: str,
        source_ip: str,
        user_agent: str,
        *,
        principal: str = "",
        labels: Mapping[str, str] | None = None,
        at_ns: int | None = None,
    ) -> Event:
        """Publish a Connected event; with the node role it carries node_id and incarnation.
        principal: who the connection is for (the authenticated user or service); labels:
        key/value pairs such as tenant or device (limits in core/labels.py; InvalidEvent
        naming the field when one is broken)."""
        node = self._node
        node_id, incarnation = "", 0
        if node is not None and node.incarnation is not None:
            node_id, incarnation = node.node_id, node.incarnation
        payload = Connected(
            source_ip, user_agent, node_id, incarnation, principal, normalized(labels)
        )
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
        return await self._activity.record(connection_id, frames, at_ns)

    async def disconnected(
        self,
        connection_id: str,
        *,
        status_code: int = 1000,
        reason: str = "",
        at_ns: int | None = None,
        cause: Cause = Cause.UNSPECIFIED,
    ) -> Event:
        """Publish the connection's pending activity, then its Disconnected (cause: who ended
        it, for the lifecycle stream)."""
        event = self._event(connection_id, Disconnected(status_code, reason, cause), at_ns)
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
        await self._handover.send_in_lanes(self._activity.drain(), deadline)
        # Events handed in before this call and still waiting for their turn are in flight after.
        await self._handover.lanes.settled(deadline - loop.time())
        spooling = self._spooling
        if spooling is not None and spooling.is_open:
            await spooling.spool.durable()  # what is spooled so far is on disk when this returns
        remaining = await self._ledger.wait(deadline)
        if remaining:
            raise DeliveryTimeoutError(
                f"{remaining} event(s) not acknowledged within {self._delivery_timeout_s:g} s; "
                "they stay in flight until stop()"
            )
        if spooling is not None and (spooled := await spooling.wait(deadline)):
            raise DeliveryTimeoutError(
                f"{spooled} event(s) still in the spool after {self._delivery_timeout_s:g} s; "
                "they are on disk and are replayed when the broker takes them"
            )
        self._outcomes.raise_if_failures()
