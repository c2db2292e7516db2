"""Activity coalescing: a busy WebSocket costs at most one Activity event per interval.

Pure logic, no I/O and no clock of its own: every call takes `now_ns` from a monotonic clock the
caller owns, so tests drive it with a fake clock and the publisher with time.monotonic_ns.

Per connection it is a throttle with a trailing edge. The first activity after a quiet interval
goes out at once (a lone frame is visible without delay); activity within `interval_ns` of the
last emission is merged into one pending activity (latest time, summed frames) that goes out when
the interval ends (`due`), or earlier when the caller forces it (`take` on disconnect, `drain` on
flush and close). Nothing recorded is ever dropped: every frame ends up in exactly one emission.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CoalescedActivity:
    connection_id: str
    latest_at_ns: int
    """The latest activity time merged in (gateway clock, nanoseconds since the epoch)."""
    frames: int
    """Frames merged in since the previous emission for this connection."""

    def merged(self, at_ns: int, frames: int) -> CoalescedActivity:
        return CoalescedActivity(
            self.connection_id, max(self.latest_at_ns, at_ns), self.frames + frames
        )


@dataclass(slots=True)
class _Window:
    ends_ns: int
    pending: CoalescedActivity | None = None


class ActivityCoalescer:
    def __init__(self, interval_ns: int) -> None:
        if interval_ns < 0:
            raise ValueError("interval_ns must be >= 0")
        self._interval_ns = interval_ns
        # Insertion order is window-end order: a window always ends at (the clock when it opened)
        # + interval, and the clock never goes back, so due() only ever looks at the front.
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._now_ns = 0
        self._pending = 0

    @property
    def interval_ns(self) -> int:
        return self._interval_ns

    def __contains__(self, connection_id: object) -> bool:
        """Whether the connection emitted within the last interval (its window is open)."""
        return connection_id in self._windows

    def __len__(self) -> int:
        """Connections tracked: those that emitted within the last interval."""
        return len(self._windows)

    @property
    def pending(self) -> int:
        """Connections with merged activity waiting for their interval to end."""
        return self._pending

    def _clock(self, now_ns: int) -> int:
        # A clock that steps back must not reorder windows; treat it as standing still.
        self._now_ns = max(self._now_ns, now_ns)
        return self._now_ns

    def record(
        self, connection_id: str, at_ns: int, frames: int, now_ns: int
    ) -> CoalescedActivity | None:
        """Record activity. Returns the activity to publish now, or None if it was merged into
        one that will be published when the connection's interval ends."""
        if frames < 0:
            raise ValueError("frames must be >= 0")
        now = self._clock(now_ns)
        if self._interval_ns == 0:
            return CoalescedActivity(connection_id, at_ns, frames)
        window = self._windows.get(connection_id)
        if window is not None and now < window.ends_ns:
            if window.pending is None:
                self._pending += 1
                window.pending = CoalescedActivity(connection_id, at_ns, frames)
            else:
                window.pending = window.pending.merged(at_ns, frames)
            return None
        # The interval is over (or there never was one): whatever is still pending goes out with
        # this activity, as one event, and a new interval starts now.
        out = CoalescedActivity(connection_id, at_ns, frames)
        if window is not None:
            del self._windows[connection_id]
            if window.pending is not None:
                self._pending -= 1
                out = window.pending.merged(at_ns, frames)
        self._windows[connection_id] = _Window(now + self._interval_ns)
        return out

    def due(self, now_ns: int) -> list[CoalescedActivity]:
        """Pending activities whose interval has ended, to publish now. Also forgets connections
        that were quiet for a whole interval, so memory follows the busy connections only."""
        now = self._clock(now_ns)
        out: list[CoalescedActivity] = []
        while self._windows:
            connection_id, window = next(iter(self._windows.items()))
            if window.ends_ns > now:
                break
            del self._windows[connection_id]
            if window.pending is not None:
                self._pending -= 1
                out.append(window.pending)
                self._windows[connection_id] = _Window(now + self._interval_ns)
        return out

    def next_deadline_ns(self) -> int | None:
        """When the earliest interval ends (monotonic clock), or None when nothing is tracked."""
        for window in self._windows.values():
            return window.ends_ns
        return None

    def take(self, connection_id: str) -> CoalescedActivity | None:
        """Remove and return the connection's pending activity (before its Disconnected), and
        forget the connection."""
        window = self._windows.pop(connection_id, None)
        if window is None or window.pending is None:
            return None
        self._pending -= 1
        return window.pending

    def drain(self) -> list[CoalescedActivity]:
        """Remove and return every pending activity (flush, close); forget all connections."""
        out = [w.pending for w in self._windows.values() if w.pending is not None]
        self._windows.clear()
        self._pending = 0
        return out
