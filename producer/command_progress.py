"""How far a node has got through its commands partition, and committing it (producer/commands.py
reads and executes; this module decides when an offset may be committed, and commits it).

A batch of commands is executed in order, and its outcomes are published without waiting for
one another's acknowledgement; the offset after the batch is committed once they all are (or
were given up), and every earlier batch's too. A committer task does that in the background, in
batch order, one commit at a time and at most every COMMIT_INTERVAL_S (a commit is a request
and a response the node pays for in CPU: ~6% of its samples at 1,000 Sends/s with a commit after
every settled batch). A node that dies loses at most that much more of its committed progress,
and its next incarnation answers those commands CONNECTION_GONE without acting on them.
Committing later than executing is safe: a command is never executed twice by one process (the
receiver remembers them), and a later start of the node is a new incarnation.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Final

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S: Final = 0.1
# Batches read ahead while earlier ones' outcomes are still being acknowledged.
MAX_UNACKNOWLEDGED_BATCHES: Final = 4
# aiokafka's commit waits, without end, for the group's coordinator while the broker is away.
COMMIT_ATTEMPT_S: Final = 5.0
_RETRY_S: Final = 0.5

Outcomes = list[asyncio.Task[None]]


class CommandProgress:
    """The committer of one node's commands partition. start() it with the consumer that reads
    the partition; as a poll's commands are done with, advanced() past each, then batch_read()
    with their outcomes' tasks and hold_back(); finish() when reading has ended."""

    def __init__(self, node_id: str) -> None:
        self._node_id = node_id
        self._consumer: Any = None
        self._tp: TopicPartition | None = None
        self._uncommitted: int | None = None  # the next offset to commit, if not committed yet
        # Batches read, oldest first, as (their outcomes' tasks, the offset after them): the
        # committer's queue; and the outcome tasks not yet all done, for hold_back().
        self._to_commit: deque[tuple[Outcomes, int]] = deque()
        self._unacknowledged: deque[Outcomes] = deque()
        self._queued = asyncio.Event()
        self._reading = False
        self._committer: asyncio.Task[None] | None = None

    def start(self, consumer: Any, tp: TopicPartition) -> None:
        self._consumer, self._tp = consumer, tp
        self._reading = True
        self._committer = asyncio.create_task(self._commit_in_order(), name="node-commands-commits")

    def advanced(self, offset: int) -> None:
        """The commands before `offset` are done with (executed, or skipped)."""
        self._uncommitted = offset

    def batch_read(self, outcomes: Outcomes) -> None:
        """A poll's commands are done with, and `outcomes` publish their outcomes. Also after an
        empty poll: a commit that failed (the broker away) is tried again."""
        if self._uncommitted is not None:
            self._to_commit.append((outcomes, self._uncommitted))
            self._queued.set()

    async def hold_back(self, outcomes: Outcomes) -> None:
        """Wait, before the next poll, while more than MAX_UNACKNOWLEDGED_BATCHES batches have
        outcomes not yet acknowledged (the broker is slow: read no further ahead)."""
        waiting = self._unacknowledged
        if outcomes:
            waiting.append(outcomes)
        while waiting and all(task.done() for task in waiting[0]):
            waiting.popleft()
        if len(waiting) > MAX_UNACKNOWLEDGED_BATCHES:
            await asyncio.wait(waiting.popleft())  # wait() never cancels the outcomes' tasks

    async def finish(self, timeout_s: float) -> None:
        """Reading has ended: let the committer commit every batch whose outcomes are settled
        within `timeout_s`, then commit what was read, once."""
        self._reading = False
        self._queued.set()
        committer, self._committer = self._committer, None
        if committer is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(committer)
            except TimeoutError:
                committer.cancel()
                await asyncio.gather(committer, return_exceptions=True)
        self._to_commit.clear()
        self._unacknowledged.clear()
        await self._commit(final=True)

    async def _commit_in_order(self) -> None:
        """Commits the offset after each batch once its outcomes, and every earlier batch's, are
        acknowledged (or given up). One commit at a time, of everything settled meanwhile.
        Returns once reading has ended and every batch read is settled."""
        queue = self._to_commit
        loop = asyncio.get_running_loop()
        next_commit = loop.time()
        while True:
            if queue and self._reading and (wait_s := next_commit - loop.time()) > 0:
                # Batches settled meanwhile are covered by the one commit after the pause (at
                # most COMMIT_INTERVAL_S: finish() waits for the committer).
                await asyncio.sleep(wait_s)
                continue
            if not queue:
                if not self._reading:
                    return
                self._queued.clear()
                await self._queued.wait()
                continue
            try:
                outcomes, offset = queue[0]
                if outcomes:
                    await asyncio.wait(outcomes)
                queue.popleft()
                while queue and all(task.done() for task in queue[0][0]):
                    offset = queue.popleft()[1]
                await self._commit(offset=offset)
                next_commit = loop.time() + COMMIT_INTERVAL_S
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=commands_commit_error node_id=%s", self._node_id)
                await asyncio.sleep(_RETRY_S)

    async def _commit(self, final: bool = False, offset: int | None = None) -> None:
        """Commit `offset` (default: everything read so far)."""
        offset = self._uncommitted if offset is None else offset
        consumer, tp = self._consumer, self._tp
        if offset is None or self._uncommitted is None or consumer is None or tp is None:
            return
        try:
            # Bounded, so the loop goes on and stop() returns while the broker is away.
            async with asyncio.timeout(COMMIT_ATTEMPT_S):
                await consumer.commit({tp: offset})
        except (KafkaError, TimeoutError) as exc:
            # The broker is away: the next commit carries it. Commands acted on meanwhile are
            # remembered, so this process does not act on them twice.
            level = logging.WARNING if final else logging.DEBUG
            log.log(level, "event=commands_commit_failed offset=%d error=%s", offset, exc)
            return
        if self._uncommitted == offset:
            self._uncommitted = None
