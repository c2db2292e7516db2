"""A publisher's activity events: each activity() call checked (cheaply once its connection's
interval is open), merged per connection by the coalescer (coalescing.py: at most one Activity
per interval, nothing dropped), and the merged ones handed over when their interval ends (a
background task), before their connection's next event, and on flush() and stop()."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from conntrack.core.events import Activity, Event, Payload
from conntrack.producer.coalescing import ActivityCoalescer, CoalescedActivity
from conntrack.producer.errors import PublisherError
from conntrack.producer.handover import Handover
from conntrack.producer.validation import check_frames, check_time, checked_value

log = logging.getLogger(__name__)

EventMaker = Callable[[str, Payload, int | None], Event]


class ActivityPublishing:
    def __init__(
        self,
        interval_s: float,
        *,
        handover: Handover,
        make_event: EventMaker,
        monotonic_ns: Callable[[], int],
        wall_clock_ns: Callable[[], int],
        delivery_timeout_s: float,
    ) -> None:
        self._coalescer = ActivityCoalescer(int(interval_s * 1_000_000_000))
        self._handover = handover
        self._make_event = make_event
        self._monotonic_ns = monotonic_ns
        self._wall_clock_ns = wall_clock_ns
        self._delivery_timeout_s = delivery_timeout_s
        self._stopping = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self.coalesced = 0
        """activity() calls merged into another Activity event instead of their own."""

    @property
    def pending(self) -> int:
        """Connections with merged activity not yet handed over."""
        return self._coalescer.pending

    def _events(self, activities: Iterable[CoalescedActivity]) -> list[Event]:
        return [
            self._make_event(a.connection_id, Activity(a.frames), a.latest_at_ns)
            for a in activities
        ]

    def take(self, connection_id: str) -> Event | None:
        """The connection's merged activity, to go out before its next event (no await: the
        caller reserves that event's turn in the same step)."""
        pending = self._coalescer.take(connection_id)
        return None if pending is None else self._events([pending])[0]

    def drain(self) -> list[Event]:
        return self._events(self._coalescer.drain())

    async def record(self, connection_id: str, frames: int, at_ns: int | None) -> Event | None:
        """One activity() call: the Activity event if one goes out now, None if merged."""
        at = self._wall_clock_ns() if at_ns is None else at_ns
        checked: Event | None = None
        value: bytes | None = None
        if connection_id in self._coalescer:
            # Its id passed the whole check when its interval opened (below); a merged call
            # brings only frames and a time, checked by the same rules, and stays cheap.
            check_frames(frames)
            check_time(at)
        else:
            checked = self._make_event(connection_id, Activity(frames), at)
            value = checked_value(checked)
        ready = self._coalescer.record(connection_id, at, frames, self._monotonic_ns())
        if ready is None:
            self.coalesced += 1
            return None
        if checked is not None and (ready.latest_at_ns, ready.frames) == (at, frames):
            event = checked
        else:
            (event,) = self._events([ready])
            value = None
        # No await between record() and reserving the turn, so this event is ordered before any
        # event of the connection handed in after this call.
        lanes = self._handover.lanes
        lane = lanes.lane_of(connection_id)
        ticket = lanes.reserve(lane)
        deadline = asyncio.get_running_loop().time() + self._delivery_timeout_s
        await self._handover.send_in_turn(lane, ticket, [event], deadline, value)
        return event

    def start(self) -> None:
        self._stopping = asyncio.Event()
        if self._coalescer.interval_ns > 0:
            self._flusher = asyncio.create_task(self._publish_due())

    async def stop(self) -> None:
        """Stop the background task (what is merged stays, for drain())."""
        self._stopping.set()
        if self._flusher is not None:
            await self._flusher
            self._flusher = None

    async def _publish_due(self) -> None:
        """Background task: hands over merged activity when its interval ends."""
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
                    await self._handover.send_in_lanes(
                        self._events(due), loop.time() + self._delivery_timeout_s
                    )
            except PublisherError:
                pass  # already counted and reported; the next interval tries again
            except Exception:
                log.exception("publishing coalesced activity failed")
