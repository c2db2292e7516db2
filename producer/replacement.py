"""The publisher's Kafka producer, and its replacement after a failed delivery.

aiokafka's idempotent producer numbers each partition's batches when it drains them and never
takes a number back. A batch it fails (one whose partition had no leader for delivery_timeout_s,
in message_accumulator.py drain_by_nodes, or one the broker refused) leaves a gap the broker
will not accept: every later batch of that partition is refused with OutOfOrderSequenceNumber,
for as long as the producer lives. The Java client resets its producer id in this case; aiokafka
has no way to, so a new producer (a new producer id, sequences from 0) takes over.

A connection's events are never on two producers at once: the new producer sends nothing before
every event of the old one is settled (acknowledged, failed, or given up after
delivery_timeout_s and reported), so what is delivered keeps its order. Meanwhile new events
wait parked in the ledger, in the order they were handed in."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from conntrack.producer import kafka_producer
from conntrack.producer.ledger import Future, Ledger, pass_on

log = logging.getLogger(__name__)


class ProducerSlot:
    """producer: the current producer (None before start, while one is being connected after a
    failure, and after close)."""

    def __init__(
        self,
        *,
        connect: Callable[[int], Awaitable[Any]],
        ledger: Ledger,
        topic: str,
        partition_of: Callable[[str], int],
        delivery_timeout_s: float,
        accepting: Callable[[], bool],
        degrade: Callable[[], None],
        also_carried: Callable[[], list[Future]],
        abandon: Callable[[Any, list[Future]], Awaitable[None]],
    ) -> None:
        """connect(retry log level): a started producer. degrade: called when a delivery
        failed (the spool takes over). also_carried: what else a producer may hold (a
        heartbeat, the spool's replay), waited for before it is retired. abandon(producer,
        futures): report those in-flight events as undelivered and fail what it holds."""
        self.producer: Any = None
        self._connect = connect
        self._ledger = ledger
        self._topic = topic
        self._partition_of = partition_of
        self._delivery_timeout_s = delivery_timeout_s
        self._accepting = accepting
        self._degrade = degrade
        self._also_carried = also_carried
        self._abandon = abandon
        self._replacer: asyncio.Task[None] | None = None
        self._failed_while_replacing = False

    @property
    def replacing(self) -> bool:
        return self._replacer is not None

    def replace_soon(self) -> None:
        """A batch failed: from now on events wait for a fresh producer."""
        if not self._accepting():
            return  # stopping: stop() reports whatever does not arrive
        self._degrade()
        if self._replacer is not None:
            self._failed_while_replacing = True
        elif self.producer is not None:
            self._replacer = asyncio.create_task(self._replace())

    def replace_soon_if_current(self, producer: Any) -> None:
        """A batch of `producer` failed; replace it unless it was replaced already."""
        if producer is self.producer:
            self.replace_soon()

    async def take(self) -> Any:
        """Stop any replacement and empty the slot; the producer it held (None: none)."""
        if self._replacer is not None:
            self._replacer.cancel()
            try:
                await self._replacer
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("replacing the Kafka producer failed")
            self._replacer = None
        producer, self.producer = self.producer, None
        return producer

    async def _replace(self) -> None:
        """Retire the failed producer, connect a new one (retrying until the broker answers),
        hand it the events that waited, in order, and let new events go straight to it again."""
        old = self.producer
        while True:
            await self._retire(old)
            self.producer = None
            new = await self._reconnect()
            self.producer = new  # take() closes it if this task is cancelled from here on
            # Failures until now were the old producer's; one from here on is the new one's.
            self._failed_while_replacing = False
            while (waiting := self._ledger.unpark()) is not None:
                record, parked = waiting
                connection_id = record.event.connection_id
                try:
                    sent = await kafka_producer.send_event(
                        new,
                        self._topic,
                        record.value,
                        connection_id,
                        self._partition_of(connection_id),
                    )
                except Exception as exc:
                    if not parked.done():
                        parked.set_exception(exc)
                else:
                    sent.add_done_callback(functools.partial(pass_on, parked))
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
        await self._ledger.handed(deadline)
        # A heartbeat it holds would keep its stop() waiting while the broker is away: wait for
        # it too, and fail it with the rest at the deadline.
        while carried := self._ledger.carried() + self._also_carried():
            # A send that was under way when the replacement began may add one more: look again.
            await asyncio.wait(carried, timeout=max(0.0, deadline - loop.time()))
            if loop.time() >= deadline:
                await self._abandon(producer, self._ledger.carried())
                break
        try:
            await producer.stop()
        except Exception:
            # Its events are all settled or reported; a connection that does not close cleanly
            # must not keep the new producer from taking over.
            log.exception("closing the replaced Kafka producer failed")

    async def _reconnect(self) -> Any:
        """A started producer. Retries until it gets one (take() cancels): the events waiting
        for it are bounded by max_pending, and flush() and stop() bound every wait for them."""
        while True:
            try:
                # One warning per delivery_timeout_s of outage, not one per attempt.
                return await self._connect(logging.DEBUG)
            except Exception as exc:
                log.warning("no new Kafka producer yet, retrying: %r", exc)
                await asyncio.sleep(kafka_producer.CONNECT_BACKOFF_S)
