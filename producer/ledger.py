"""The publisher's in-flight ledger: the events handed to a producer and not yet settled, in the
order they were handed in, each with its encoding (what the producer, the spool and a new
producer all send, so an event is encoded once); the room `max_pending` leaves for more; the
events parked while the producer is being replaced; and whether an event is being handed to the
producer right now (the spool is not left, nor a replaced producer stopped, while one is)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import ItemsView, Iterator
from dataclasses import dataclass
from typing import Any

from conntrack.core.events import Event

Future = asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class Record:
    event: Event
    value: bytes
    handed_at: float = 0.0
    """Event-loop time the caller handed the event in (0: not timed, e.g. a report)."""


class Ledger:
    def __init__(self, max_pending: int) -> None:
        self._max_pending = max_pending
        self._room = asyncio.Semaphore(max_pending)
        self._records: dict[Future, Record] = {}
        self._parked: deque[tuple[Record, Future]] = deque()
        self._handing = 0
        self._handed = asyncio.Event()
        self._handed.set()

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, future: object) -> bool:
        return future in self._records

    def reset_room(self) -> None:
        """All the room again (a new run: nothing is in flight)."""
        self._room = asyncio.Semaphore(self._max_pending)

    async def take_room(self, deadline: float) -> None:
        """Room for one more event, waiting until `deadline` (TimeoutError after it)."""
        if self._room.locked():
            async with asyncio.timeout_at(deadline):
                await self._room.acquire()
        else:
            await self._room.acquire()  # returns at once; skips the timer's cost

    def give_room(self) -> None:
        """Give back room taken for an event that was not tracked after all."""
        self._room.release()

    def track(self, future: Future, record: Record) -> None:
        self._records[future] = record

    def pop(self, future: Future) -> Record | None:
        """The record of a settled event, its room given back; None if it was already popped."""
        record = self._records.pop(future, None)
        if record is not None:
            self._room.release()
        return record

    def items(self) -> ItemsView[Future, Record]:
        return self._records.items()

    def futures(self) -> list[Future]:
        return list(self._records)

    def oldest(self) -> Future | None:
        return next(iter(self._records), None)

    async def wait(self, deadline: float) -> int:
        """Wait until everything in flight now is settled or the deadline passes; how many of
        them remain."""
        futures = list(self._records)
        if futures:
            timeout = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait(futures, timeout=timeout)
        return sum(1 for f in futures if f in self._records)

    # -- parked while the producer is replaced ------------------------------------------------

    def park(self, record: Record) -> Future:
        """Track an event that waits for the new producer; its future settles as its record."""
        parked: Future = asyncio.get_running_loop().create_future()
        self._parked.append((record, parked))
        self._records[parked] = record
        return parked

    def unpark(self) -> tuple[Record, Future] | None:
        return self._parked.popleft() if self._parked else None

    def clear_parked(self) -> None:
        self._parked.clear()

    def carried(self) -> list[Future]:
        """In-flight events already handed to a producer (not waiting parked)."""
        waiting = {parked for _, parked in self._parked}
        return [f for f in self._records if f not in waiting]

    # -- being handed over ---------------------------------------------------------------------

    @property
    def handing(self) -> bool:
        return self._handing > 0

    @contextlib.contextmanager
    def handing_over(self) -> Iterator[None]:
        self._handing += 1
        self._handed.clear()
        try:
            yield
        finally:
            self._handing -= 1
            if not self._handing:
                self._handed.set()

    async def handed(self, deadline: float) -> None:
        """Wait (until `deadline`) until no event is being handed over."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._handed.wait()


def pass_on(parked: Future, done: Future) -> None:
    """Settle a parked event's future as the producer settled its record."""
    if parked.done():
        return  # already reported (stop() gave up on it)
    if done.cancelled():
        parked.cancel()
    elif (exc := done.exception()) is not None:
        parked.set_exception(exc)
    else:
        parked.set_result(done.result())
