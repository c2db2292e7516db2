"""How the publisher hands events to its producer and learns what became of them.

Sends are ordered per partition (producer/lanes.py): an activity taken from the coalescer and
the Disconnected after it reach the producer in that order even when other tasks publish
concurrently, and a partition whose batch cannot be sent (its leader is away) holds up only its
own connections. Each event takes room in the ledger (at most max_pending unacknowledged; beyond
it, publishing waits, and gives up with BrokerUnavailableError after delivery_timeout_s). While
the spool is active, or the producer is being replaced and there is a spool, new events go to
the spool; without a spool they wait parked for the new producer.

The rule every event follows: it is acknowledged by the broker, or kept by the spool, or
reported (counted, passed to on_undeliverable) exactly once, and the call that handed it in (or
the next flush()/stop()) raises."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.errors import KafkaError, KafkaTimeoutError

from conntrack.core import aiokafka_internals
from conntrack.core.events import Event, encode
from conntrack.producer import kafka_producer
from conntrack.producer.errors import (
    BrokerUnavailableError,
    DeliveryTimeoutError,
    PublisherClosedError,
    PublisherError,
)
from conntrack.producer.lanes import Lanes, Ticket
from conntrack.producer.ledger import Future, Ledger, Record
from conntrack.producer.outcomes import Outcomes
from conntrack.producer.replacement import ProducerSlot
from conntrack.producer.spooling import Spooling


class Handover:
    def __init__(
        self,
        *,
        ledger: Ledger,
        outcomes: Outcomes,
        spooling: Spooling | None,
        topic: str,
        delivery_timeout_s: float,
    ) -> None:
        self._ledger = ledger
        self._outcomes = outcomes
        self._spooling = spooling
        self._topic = topic
        self._delivery_timeout_s = delivery_timeout_s
        self._slot: ProducerSlot | None = None
        # Replaced by start(), which knows the partition count.
        self.lanes = Lanes(1)

    def attach(self, slot: ProducerSlot) -> None:
        self._slot = slot

    def partition_of(self, connection_id: str) -> int:
        return self.lanes.lane_of(connection_id)

    def degrade(self) -> None:
        if self._spooling is not None:
            self._spooling.degrade()

    # -- sending --------------------------------------------------------------------------------

    async def send_in_lanes(self, events: list[Event], deadline: float) -> None:
        """Send events of any connections: a turn in each lane they need is reserved now, in
        this order, and the lanes' shares go out concurrently, so a lane that waits holds up
        only its own. Raises the first failure once all have been handled."""
        if not events:
            return
        shares: dict[int, list[Event]] = {}
        for event in events:
            shares.setdefault(self.lanes.lane_of(event.connection_id), []).append(event)
        turns = [(lane, self.lanes.reserve(lane), share) for lane, share in shares.items()]
        if len(turns) == 1:
            lane, ticket, share = turns[0]
            await self.send_in_turn(lane, ticket, share, deadline, taken=len(share))
            return
        outcomes = await asyncio.gather(
            *(
                self.send_in_turn(lane, ticket, share, deadline, taken=len(share))
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

    async def send_in_turn(
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
            await self.lanes.acquire(lane, ticket)
        except BaseException as exc:
            for event in events[:taken]:
                self.report(Record(event, encode(event)), exc)
            raise
        try:
            if len(events) == 1:
                await self._send(events[0], deadline, lane, value)
            else:
                await self._send_all(events, deadline, lane)
        finally:
            self.lanes.release(lane)

    async def _send_all(self, events: list[Event], deadline: float, lane: int) -> None:
        """Send each event (all of one lane, whose turn the caller holds); after the deadline
        the rest are reported without trying. Raises the first failure once all have been
        handled."""
        first: PublisherError | None = None
        for event in events:
            if first is not None and asyncio.get_running_loop().time() >= deadline:
                self.report(Record(event, encode(event)), first)
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
        """Hand one event to the producer; the caller holds the turn of its lane (its
        partition). Reports and raises on failure."""
        slot = self._slot
        assert slot is not None
        # The caller's deadline is its hand-in time plus the delivery timeout, so the delivery
        # latency (hand-in to acknowledgement) costs no clock read on the way in.
        record = Record(
            event,
            encode(event) if value is None else value,
            deadline - self._delivery_timeout_s,
        )
        if slot.producer is None and not slot.replacing:
            closed = PublisherClosedError("Publisher was stopped before the event could be sent")
            self.report(record, closed)
            raise closed
        spooling = self._spooling
        if spooling is not None and (spooling.active or slot.replacing):
            spooling.take_new(record)
            return
        acquired = False
        try:
            await self._ledger.take_room(deadline)
            acquired = True
            if slot.replacing:
                self._ledger.park(record).add_done_callback(self._settle)
                return
            # aiokafka bounds its own waits (metadata, a full batch) by request_timeout_ms,
            # which is delivery_timeout_s, and raises KafkaTimeoutError after it.
            with self._ledger.handing_over():
                future = await kafka_producer.send_event(
                    slot.producer, self._topic, record.value, event.connection_id, lane
                )
        except (TimeoutError, KafkaTimeoutError) as exc:
            if acquired:
                self._ledger.give_room()
            error: PublisherError = BrokerUnavailableError(
                f"the broker did not take event {event.event_id} within "
                f"{self._delivery_timeout_s:g} s ({len(self._ledger)} events unacknowledged)"
            )
            if self.report(record, error):
                return  # in the spool
            raise error from exc
        except KafkaError as exc:
            if acquired:
                self._ledger.give_room()
            error = PublisherError(f"cannot publish event {event.event_id}: {exc!r}")
            if self.report(record, error):
                return
            raise error from exc
        except BaseException as exc:
            if acquired:
                self._ledger.give_room()
            self.report(record, exc)
            raise
        self._ledger.track(future, record)
        future.add_done_callback(self._settle)
        if spooling is not None and spooling.active:
            # The switch came while this one was being handed over (waiting for room or for
            # the producer): it belongs in the spool before any later event, as if in flight.
            spooling.keep(record)

    # -- outcomes -------------------------------------------------------------------------------

    def _settle(self, future: Future) -> None:
        if future in self._ledger and (future.cancelled() or future.exception() is not None):
            self.degrade()  # while this event is still among the in-flight ones, in order
        record = self._ledger.pop(future)
        if record is None:
            return  # already reported when the producer was closed
        if future.cancelled():
            self.report(record, DeliveryTimeoutError("delivery was cancelled"))
        elif (exc := future.exception()) is not None:
            self.report(record, exc)
            assert self._slot is not None
            self._slot.replace_soon()
        else:
            self._outcomes.delivered_after(asyncio.get_running_loop().time() - record.handed_at)
            if self._spooling is not None:
                self._spooling.acknowledged(record.event.event_id)

    def report(self, record: Record, error: BaseException) -> bool:
        """An event was not delivered: with the spool, keep it there (True); otherwise, or if
        the spool refuses it, count and report it (False)."""
        if self._spooling is not None and self._spooling.absorb(record):
            return True
        self._outcomes.undeliverable(record.event, error)
        return False

    async def abandon(self, producer: Any, futures: list[Future]) -> None:
        """Report these in-flight events as not acknowledged in time, failing what the producer
        still holds of them (aiokafka_internals.fail_held says why)."""
        error = DeliveryTimeoutError(
            f"not acknowledged within {self._delivery_timeout_s:g} s; the broker may still "
            "have received it"
        )
        if futures:
            self.degrade()  # before any of them is taken out of the ledger: keeps their order
        await aiokafka_internals.fail_held(producer, error)
        for future in futures:
            record = self._ledger.pop(future)
            if record is None:
                continue
            cause = future.exception() if future.done() and not future.cancelled() else None
            # Its outcome is reported here; a parked future must not be settled again later.
            future.cancel()
            self.report(record, cause or error)
