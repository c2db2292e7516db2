"""The node's side of a broadcast command (core/commands.py, BroadcastFrame): the
same frame written to each of the listed sockets the node still holds, through the gateway's own
CommandHandler.send, a bounded number at a time.

The tally is kept as the writes finish, so a broadcast cut short by its deadline still reports
how many sockets it reached (producer/commands.py publishes it as the outcome's `delivered`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final, Protocol

from conntrack.core.commands import BroadcastFrame, DataType

# Writes in flight at once: a slow client's socket holds one slot, not the whole broadcast.
CONCURRENT_WRITES: Final = 64


class Sender(Protocol):
    async def send(self, connection_id: str, data: bytes, data_type: DataType, /) -> bool: ...


@dataclass
class BroadcastTally:
    delivered: int = 0
    """Sockets the frame was written to."""
    gone: int = 0
    """Ids the node did not hold (closed meanwhile, or never here)."""
    failed: int = 0
    """Writes that raised; `error` is the first one's."""
    error: str = ""


async def broadcast_to_sockets(
    sender: Sender,
    frame: BroadcastFrame,
    tally: BroadcastTally,
    *,
    concurrency: int = CONCURRENT_WRITES,
) -> None:
    """Write `frame` to each of its sockets, `concurrency` at a time, counting into `tally` as
    writes finish. A write that raises is counted as failed and the others go on; cancel the
    call to stop (the tally keeps what was done)."""
    ids = iter(frame.connection_ids)

    async def worker() -> None:
        for connection_id in ids:  # one shared iterator: each id is taken once
            try:
                held = await sender.send(connection_id, frame.data, frame.type)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                tally.failed += 1
                if not tally.error:
                    tally.error = f"{type(exc).__name__}: {exc}"[:1000]
                continue
            if held:
                tally.delivered += 1
            else:
                tally.gone += 1

    workers = min(concurrency, len(frame.connection_ids))
    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())
