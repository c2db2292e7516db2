"""The node's side of a command for many of its sockets (core/commands.py: BroadcastFrame writes
the same frame to each, CloseSockets closes each), through the gateway's own CommandHandler, a
bounded number at a time.

The tally is kept as the operations finish, so a command cut short by its deadline still
reports which sockets it reached (producer/command_execution.py publishes the ids it did not
hold, failed on or had not reached; every other id was done)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from conntrack.core.commands import BroadcastFrame, CloseSockets, DataType, ManySockets

# Operations in flight at once: a slow client's socket holds one slot, not the whole command.
CONCURRENT_WRITES: Final = 64


@dataclass
class SocketsTally:
    done: int = 0
    """Sockets written to (or closed)."""
    gone_ids: list[str] = field(default_factory=list)
    """Ids the node did not hold (closed meanwhile, or never here)."""
    failed_ids: list[str] = field(default_factory=list)
    """Ids whose operation raised; `error` is the first one's."""
    error: str = ""
    finished: set[str] = field(default_factory=set)
    """Every id whose operation ended, whichever way."""

    def unreached(self, ids: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(i for i in ids if i not in self.finished)


class Handler(Protocol):
    """What a many-sockets command needs of the gateway (producer/command_execution.py,
    CommandHandler, has both)."""

    async def send(self, connection_id: str, data: bytes, data_type: DataType, /) -> bool: ...

    async def disconnect(self, connection_id: str, status_code: int, reason: str, /) -> bool: ...


def operation_of(handler: Handler, action: ManySockets) -> Callable[[str], Awaitable[bool]]:
    """The per-socket operation of a many-sockets action: True when done, False when the node
    holds no such socket."""
    if isinstance(action, BroadcastFrame):
        return lambda cid: handler.send(cid, action.data, action.type)
    assert isinstance(action, CloseSockets)
    return lambda cid: handler.disconnect(cid, action.status_code, action.reason)


async def each_socket(
    operation: Callable[[str], Awaitable[bool]],
    connection_ids: tuple[str, ...],
    tally: SocketsTally,
    *,
    concurrency: int = CONCURRENT_WRITES,
) -> None:
    """Run `operation` on each id, `concurrency` at a time, counting into `tally` as they
    finish. One that raises is counted as failed and the others go on; cancel the call to stop
    (the tally keeps what was done)."""
    ids = iter(connection_ids)

    async def worker() -> None:
        for connection_id in ids:  # one shared iterator: each id is taken once
            try:
                held = await operation(connection_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                tally.failed_ids.append(connection_id)
                tally.finished.add(connection_id)
                if not tally.error:
                    tally.error = f"{type(exc).__name__}: {exc}"[:1000]
                continue
            tally.finished.add(connection_id)
            if held:
                tally.done += 1
            else:
                tally.gone_ids.append(connection_id)

    workers = min(concurrency, len(connection_ids))
    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())
