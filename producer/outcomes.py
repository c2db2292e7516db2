"""What became of the events handed in: how many were delivered and how many not, each event
that was not reported once (counted, logged once per run of failures, passed to the gateway's
`on_undeliverable`), and the failures since the last check raised by flush() and stop().
PublisherStats gathers these with the other parts' numbers, for the gateway's metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from conntrack.core.events import Event
from conntrack.core.latency import LatencySnapshot, LatencyTally
from conntrack.producer.errors import UndeliveredEventsError

log = logging.getLogger(__name__)

UndeliverableCallback = Callable[[Event, BaseException], None]


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
    """NodeHeartbeat events not sent or not acknowledged (node role only; see node_role.py)."""
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
    spool_max_bytes: int = 0
    """The spool's limit (0: no spool)."""
    spool_lost: int = 0
    """Events the disk refused to write (a failing disk; each logged as an error)."""
    delivery_latency: LatencySnapshot | None = None
    """Seconds from publishing an event (the call) to the broker's acknowledgement."""


class Outcomes:
    def __init__(self, on_undeliverable: UndeliverableCallback | None) -> None:
        self._on_undeliverable = on_undeliverable
        self.delivered = 0
        self.delivery = LatencyTally()
        self.undelivered = 0
        self._since_check = 0
        self._first: BaseException | None = None

    def delivered_after(self, seconds: float) -> None:
        self.delivered += 1
        self.delivery.observe(seconds)

    def undeliverable(self, event: Event, error: BaseException) -> None:
        self.undelivered += 1
        self._since_check += 1
        if self._first is None:
            self._first = error
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

    def raise_if_failures(self) -> None:
        """UndeliveredEventsError for the failures since the last call, if any."""
        if self._since_check:
            count, first = self._since_check, self._first
            self._since_check, self._first = 0, None
            assert first is not None
            raise UndeliveredEventsError(count, first)
