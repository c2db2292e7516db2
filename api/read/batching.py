"""Request coalescing ("DataLoader", smart batching): concurrent lookups by key share one query.

A lookup that arrives while fewer than `max_in_flight` queries run is sent on the next loop
turn, together with whatever else arrived in the same turn, so an idle server adds no latency.
Lookups that arrive while `max_in_flight` queries run wait and go together in the next query,
which starts the moment one of the running queries finishes. So batches grow exactly when the
database round trip, not the event loop, is what callers wait for, and one query's fixed cost
(connection, statement execution, a round trip) is shared by everyone in it.

Under load that is not enough: a query returns in a fraction of the time the server spends on
one call, so callers trickle in one per query. `window` (a batching window, like Kafka's
`linger.ms` or Nagle's algorithm, but only under load) makes a query start no sooner than
`window` seconds after the previous one started: lookups arriving meanwhile go together. Some
lookups still go on the next turn: one arriving when no query started within the last `window`
(an idle or lightly loaded server), one alone in the loader right after a query that answered
a single caller (a client calling one Get after another: nobody could share its query), and a
full batch (`max_keys`). Why and its effect: docs/api.md, "How a Get is answered";
figures: BENCHMARKS.md, 3.

A lookup only ever joins a query that has not started yet: a caller never receives a result
read before it asked (callers rely on that for read-your-writes and freshness lower bounds).

Cancellation is per caller: a caller that gives up (deadline, client gone) leaves its batch, and
the query is cancelled only once every caller in it has left, so that abandoned work stops
(e.g. a PostgreSQL query waiting on a lock) without one impatient caller failing the rest."""

from __future__ import annotations

import asyncio
import functools
import math
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class LoaderStats:
    queries: int  # batch queries started since the loader was made
    keys: int  # distinct keys those queries asked for (keys / queries: mean batch size)
    in_flight: int  # queries running now
    waiting: int  # callers whose query has not started yet


class _Batch(Generic[K, V]):
    """The callers of one query. Each caller has a future of its own, so that cancelling one
    caller's wait never cancels what the others wait for."""

    __slots__ = ("callers", "task", "waiters")

    def __init__(self) -> None:
        self.waiters: dict[K, list[asyncio.Future[V | None]]] = {}
        self.callers = 0  # callers still waiting, over all keys
        self.task: asyncio.Task[None] | None = None  # None while queued

    def unanswered(self) -> list[asyncio.Future[V | None]]:
        return [f for futures in self.waiters.values() for f in futures if not f.done()]


class CoalescingLoader(Generic[K, V]):
    """Looks keys up through `fetch`, which receives distinct keys (at most `max_keys`) and
    returns the values it found; a key it leaves out is answered None. If `fetch` raises an
    Exception, every caller of that batch gets it."""

    def __init__(
        self,
        fetch: Callable[[Sequence[K]], Awaitable[Mapping[K, V]]],
        *,
        max_keys: int = 256,
        max_in_flight: int = 1,
        window: float = 0.0,
    ) -> None:
        if max_keys < 1 or max_in_flight < 1:
            raise ValueError("max_keys and max_in_flight must be at least 1")
        if not window >= 0:
            raise ValueError("window must be at least 0 seconds")
        self._fetch = fetch
        self._max_keys = max_keys
        self._max_in_flight = max_in_flight
        self._window = window
        self._last_launch = -math.inf  # loop.time() at which the newest query started
        self._last_callers = 0  # callers of the newest query when it started
        # Queued batches, oldest first; only the newest one takes more keys, but a key already
        # queued joins the batch it is in.
        self._queue: deque[_Batch[K, V]] = deque()
        self._queued: dict[K, _Batch[K, V]] = {}
        self._running: set[_Batch[K, V]] = set()
        # The pending launch: None, or the handle of a call_soon/call_later that runs _launch.
        self._launch_handle: asyncio.Handle | None = None
        self._queries = 0
        self._keys = 0

    def stats(self) -> LoaderStats:
        return LoaderStats(
            queries=self._queries,
            keys=self._keys,
            in_flight=len(self._running),
            waiting=sum(batch.callers for batch in self._queue),
        )

    async def load(self, key: K) -> V | None:
        """The value `fetch` finds for key, or None; raises what `fetch` raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[V | None] = loop.create_future()
        batch = self._queued.get(key)
        if batch is not None:
            batch.waiters[key].append(future)
        else:
            batch = self._queue[-1] if self._queue else None
            if batch is None or len(batch.waiters) >= self._max_keys:
                batch = _Batch()
                self._queue.append(batch)
            batch.waiters[key] = [future]
            self._queued[key] = batch
        batch.callers += 1
        self._schedule_launch(full=len(batch.waiters) >= self._max_keys)
        try:
            return await future
        except asyncio.CancelledError:
            self._leave(batch, key, future)
            raise

    async def wait_idle(self) -> None:
        """Until no query runs (callers still queued start theirs meanwhile)."""
        while pending := [b.task for b in self._running if b.task and not b.task.done()]:
            await asyncio.wait(pending)

    def cancel_running(self) -> None:
        """Cancel the queries running now; their callers' waits are cancelled too (for a server
        that is stopping, past its grace)."""
        for batch in self._running:
            if batch.task is not None:
                batch.task.cancel()

    def _schedule_launch(self, *, full: bool = False) -> None:
        """Arranges for queued batches to start when a slot is free: on the next turn (so that
        callers resumed in the same turn join), or, within `window` of the previous start, at
        the end of that window; a full batch or a lone caller (_alone) does not wait for it."""
        if not self._queue or len(self._running) >= self._max_in_flight:
            return  # _finished schedules again when a slot frees
        pending = self._launch_handle
        if pending is not None and not (full and isinstance(pending, asyncio.TimerHandle)):
            return  # a launch is already due no later than this one would be
        loop = asyncio.get_running_loop()
        at_once = full or self._alone()
        delay = 0.0 if at_once else self._last_launch + self._window - loop.time()
        if pending is not None:
            pending.cancel()  # a full batch does not wait for the window
        self._launch_handle = (
            loop.call_later(delay, self._launch) if delay > 0 else loop.call_soon(self._launch)
        )

    def _alone(self) -> bool:
        """Whether the caller that just arrived is the only one in the loader, and the previous
        query also answered just one: a client calling one Get after another, with nobody
        around to share its query, for whom waiting for the window would only add latency.
        Under load queries answer several callers, so a caller that happens to find the loader
        empty still waits and batches keep forming."""
        return (
            self._last_callers <= 1
            and not self._running
            and len(self._queue) == 1
            and self._queue[0].callers == 1
        )

    def _launch(self) -> None:
        self._launch_handle = None
        loop = asyncio.get_running_loop()
        if self._queue and len(self._running) < self._max_in_flight:
            self._last_launch = loop.time()
        while self._queue and len(self._running) < self._max_in_flight:
            batch = self._queue.popleft()
            self._last_callers = batch.callers
            keys = list(batch.waiters)
            for key in keys:
                del self._queued[key]
            self._queries += 1
            self._keys += len(keys)
            self._running.add(batch)
            batch.task = loop.create_task(self._run(batch, keys))
            # A callback, not a `finally` in _run: a task cancelled before its first step never
            # runs its coroutine at all, and its slot must still be given back.
            batch.task.add_done_callback(functools.partial(self._finished, batch))

    async def _run(self, batch: _Batch[K, V], keys: list[K]) -> None:
        try:
            found = await self._fetch(keys)
        except Exception as exc:
            for future in batch.unanswered():
                future.set_exception(exc)
        else:
            for key, futures in batch.waiters.items():
                value = found.get(key)
                for future in futures:
                    if not future.done():
                        future.set_result(value)

    def _finished(self, batch: _Batch[K, V], _task: asyncio.Task[None]) -> None:
        # Futures still unanswered here mean the query was cancelled (every caller left, or the
        # loop is shutting down): nobody is owed an answer, but nobody may wait forever either.
        for future in batch.unanswered():
            future.cancel()
        self._running.discard(batch)
        # The callers queued meanwhile have waited a whole query already: no extra turn for
        # them, only what is left of the window.
        if self._launch_handle is None and (
            self._last_launch + self._window <= asyncio.get_running_loop().time()
        ):
            self._launch()
        else:
            self._schedule_launch()

    def _leave(self, batch: _Batch[K, V], key: K, future: asyncio.Future[V | None]) -> None:
        if future.done() and not future.cancelled():
            # Answered, but cancelled before it resumed: mark an exception as retrieved, so that
            # asyncio does not report it as never retrieved.
            future.exception()
            return
        future.cancel()  # a no-op unless the caller was cancelled some other way than through it
        if batch.task is None:
            # Still queued: forget the caller, and its key if nobody else asked for it.
            futures = batch.waiters[key]
            futures.remove(future)
            if not futures:
                del batch.waiters[key]
                del self._queued[key]
            batch.callers -= 1
            if not batch.callers:
                self._queue.remove(batch)
            return
        batch.callers -= 1
        if not batch.callers and not batch.task.done():
            batch.task.cancel()
