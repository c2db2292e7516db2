"""Send order per partition: the publisher hands a connection's events to the producer one at a
time and in the order they were handed in, without making unrelated connections wait.

A lane is one partition of the events topic. A connection's events all go to one partition (the
record key is the connection id, placed as Kafka's default partitioner does: murmur2 of the key
modulo the partition count), so ordering the sends of each lane orders each connection's events,
through every retry and the spool (which keeps the order in which events reached it).

Why lanes and not one lock: aiokafka's send() waits while its partition's batch is full and
cannot be sent (the leader is away during a broker failover: up to about 10 s). Behind one lock
every connection of the node waited for that one partition (issue #16); behind its lane only the
connections of that partition wait.

A turn is reserved with reserve(), which never waits: the order is fixed at the moment an event
is handed in, before the call waits for anything. acquire() then waits for the turn (cancel-safe,
like asyncio.Lock: a cancelled waiter gives its turn up, a cancelled holder passes it on), and
release() passes it to the next in line. settled() waits until every turn reserved before it
was called has ended: what flush() and stop() need, without waiting for later events.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque

from conntrack.core.kafka import partition_of

Ticket = asyncio.Future[None] | None
"""A reserved turn: None when it was free at once, else a future set when it comes."""


class _Lane:
    __slots__ = ("held", "waiters")

    def __init__(self) -> None:
        self.held = False
        self.waiters: deque[asyncio.Future[None]] = deque()


class Lanes:
    """`count` independent FIFO turns, one per partition."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("lanes: count must be >= 1")
        self.count = count
        self._lanes = [_Lane() for _ in range(count)]

    def lane_of(self, key: str) -> int:
        return partition_of(key.encode(), self.count)

    @property
    def busy(self) -> int:
        """Lanes a turn holds or is reserved in."""
        return sum(1 for lane in self._lanes if lane.held)

    def reserve(self, lane: int) -> Ticket:
        """Take a place in the lane's line, now (no await)."""
        state = self._lanes[lane]
        if not state.held:
            state.held = True
            return None
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiters.append(ticket)
        return ticket

    async def acquire(self, lane: int, ticket: Ticket) -> None:
        """Wait until the reserved turn comes; then the caller holds the lane until release()."""
        if ticket is None or ticket.done():
            if ticket is not None and ticket.cancelled():
                raise asyncio.CancelledError
            return
        try:
            await ticket
        except asyncio.CancelledError:
            # Handed the turn just as the waiter was cancelled: pass it on, or the lane stalls.
            if ticket.done() and not ticket.cancelled():
                self.release(lane)
            raise

    def release(self, lane: int) -> None:
        """End the current turn: hand the lane to the next waiter still waiting."""
        state = self._lanes[lane]
        while state.waiters:
            ticket = state.waiters.popleft()
            if not ticket.done():  # a cancelled waiter gave its place up
                ticket.set_result(None)
                return
        state.held = False

    def _pass_on(self, lane: int, _: asyncio.Future[None]) -> None:
        self.release(lane)

    async def settled(self, timeout_s: float) -> bool:
        """Wait (at most timeout_s) until every turn reserved so far has ended; whether they
        all did. A turn reserved after this call is not waited for."""
        marks: list[asyncio.Future[None]] = []
        for index, state in enumerate(self._lanes):
            if state.held:
                mark = self.reserve(index)
                assert mark is not None
                # Passed on as soon as it comes, even if this call has timed out by then.
                mark.add_done_callback(functools.partial(self._pass_on, index))
                marks.append(mark)
        if not marks:
            return True
        _, waiting = await asyncio.wait(marks, timeout=max(0.0, timeout_s))
        return not waiting
