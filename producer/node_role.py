"""A publisher's node role (node_id=...): at start, a new incarnation (producer/node.py) and
NodeStarted, acknowledged before any connection event can be handed in; then NodeHeartbeat
every heartbeat_interval_s from a background task.

The node's own events are outside the publisher's delivery rule: they are not counted in
delivered/undelivered and never reach on_undeliverable. A heartbeat that cannot be handed over
at once, or is not acknowledged, is dropped (counted in heartbeats_dropped): the next one says
the same, newer. One heartbeat at most is unacknowledged at a time. Heartbeats go straight to
the producer, outside the lanes and max_pending: connection events neither wait for them nor
make them wait."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Callable
from typing import Any

from aiokafka.errors import KafkaError, KafkaTimeoutError

from conntrack.core.events import HEADERS, Event, InvalidEvent, NodeHeartbeat, NodeStarted
from conntrack.core.events import record_key as key_of
from conntrack.producer.errors import BrokerUnavailableError, PublisherError
from conntrack.producer.ledger import Future
from conntrack.producer.node import next_incarnation
from conntrack.producer.replacement import ProducerSlot
from conntrack.producer.validation import checked_value

log = logging.getLogger(__name__)


class NodeRole:
    def __init__(
        self,
        node_id: str,
        gateway_id: str,
        topic: str,
        *,
        heartbeat_interval_s: float,
        delivery_timeout_s: float,
        wall_clock_ns: Callable[[], int],
    ) -> None:
        self.node_id = node_id
        self._gateway_id = gateway_id
        self._topic = topic
        self._interval_s = heartbeat_interval_s
        self._delivery_timeout_s = delivery_timeout_s
        self._wall_clock_ns = wall_clock_ns
        self.incarnation: int | None = None
        self._task: asyncio.Task[None] | None = None
        # The one unacknowledged heartbeat, and when it was handed over.
        self._in_flight: Future | None = None
        self._sent_at: float | None = None
        self._failing = False
        self.delivered = 0
        self.dropped = 0

    def _event(self, payload: NodeStarted | NodeHeartbeat) -> Event:
        return Event(str(uuid.uuid4()), "", self._gateway_id, self._wall_clock_ns(), payload)

    async def announce_start(self, producer: Any, deadline: float) -> None:
        """Choose this start's incarnation and publish NodeStarted, waiting for the broker's
        acknowledgement: it is in the log before any Connected of this incarnation is sent."""
        self.incarnation = next_incarnation(self.node_id, self._wall_clock_ns())
        event = self._event(NodeStarted(self.node_id, self.incarnation))
        value = checked_value(event)
        try:
            async with asyncio.timeout_at(deadline):
                future = await producer.send(
                    self._topic, value=value, key=key_of(event), headers=list(HEADERS)
                )
                await future
        except (TimeoutError, KafkaTimeoutError) as exc:
            raise BrokerUnavailableError(
                f"the broker did not acknowledge NodeStarted of node {self.node_id} within "
                f"{self._delivery_timeout_s:g} s"
            ) from exc
        except KafkaError as exc:
            raise PublisherError(
                f"cannot publish NodeStarted of node {self.node_id}: {exc!r}"
            ) from exc

    def start(self, slot: ProducerSlot) -> None:
        self._task = asyncio.create_task(self._beat(slot))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def pending(self) -> list[Future]:
        return [] if self._in_flight is None else [self._in_flight]

    async def wait(self, deadline: float) -> None:
        if heartbeats := self.pending():
            timeout = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait(heartbeats, timeout=timeout)

    def forget(self) -> None:
        """The producer holding the heartbeat in flight was closed."""
        self._in_flight = None

    async def _beat(self, slot: ProducerSlot) -> None:
        """One NodeHeartbeat every interval until stop(). A beat missed (the loop was busy) is
        not made up for."""
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self._interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += self._interval_s
            if next_at <= loop.time():
                next_at = loop.time() + self._interval_s
            try:
                # Handing it over may wait (metadata, a full batch) until the next one is due.
                await self._send(slot, max(0.001, next_at - loop.time()))
            except Exception:
                log.exception("publishing a heartbeat failed")

    async def _send(self, slot: ProducerSlot, timeout_s: float) -> None:
        """Hand one NodeHeartbeat straight to the producer, or drop it."""
        assert self.incarnation is not None
        pending = self._in_flight
        # Normally settled long before: failed with its batch after delivery_timeout_s at most.
        # Never let one lost future silence the node.
        if (
            pending is not None
            and self._sent_at is not None
            and asyncio.get_running_loop().time() - self._sent_at
            > self._delivery_timeout_s + self._interval_s
        ):
            self._in_flight = pending = None
        producer = slot.producer
        if producer is None or slot.replacing or pending is not None:
            # No producer to take it now, or the previous one is still unacknowledged: the
            # broker is slow or away, and a queued heartbeat would say nothing when it arrives.
            self._drop("the previous heartbeat is unacknowledged or no producer")
            return
        event = self._event(NodeHeartbeat(self.node_id, self.incarnation))
        try:
            value = checked_value(event)
            async with asyncio.timeout(timeout_s):
                future = await producer.send(
                    self._topic, value=value, key=key_of(event), headers=list(HEADERS)
                )
        except (InvalidEvent, TimeoutError, KafkaError) as exc:
            self._drop(repr(exc))
            return
        self._in_flight = future
        self._sent_at = asyncio.get_running_loop().time()
        future.add_done_callback(functools.partial(self._settled, slot, producer))

    def _settled(self, slot: ProducerSlot, producer: Any, future: Future) -> None:
        if self._in_flight is future:
            self._in_flight = None
        if future.cancelled():
            self._drop("cancelled")
        elif (exc := future.exception()) is not None:
            self._drop(repr(exc))
            # Its failed batch leaves a sequence gap on its partition, which breaks the
            # producer for the connection events there too (producer/replacement.py).
            slot.replace_soon_if_current(producer)
        else:
            self.delivered += 1
            self._failing = False

    def _drop(self, why: str) -> None:
        self.dropped += 1
        # One warning per run of failures, not one per heartbeat.
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(level, "heartbeat of node %s dropped: %s", self.node_id, why)
