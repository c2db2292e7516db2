"""What a gateway node does with one of its commands: CONNECTION_GONE for a command of an older
incarnation of the node (its sockets died with that start), EXPIRED for one read after its
expires_at, otherwise the gateway's handler (CommandHandler) within the command's deadline:
`send` / `disconnect` return False when the node holds no such socket (CONNECTION_GONE); an
exception or running past the deadline is FAILED, with the reason in `detail`; a broadcast
(or a disconnect of many sockets) reports how many of its sockets were done and which ids it
did not hold, failed on or had not reached."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Final, Protocol, runtime_checkable

from conntrack.core.commands import (
    BroadcastFrame,
    CloseSocket,
    CloseSockets,
    Command,
    DataType,
    FenceNotice,
    ManySockets,
    Outcome,
    OutcomeStatus,
    SendFrame,
)
from conntrack.core.latency import LatencyTally
from conntrack.producer.broadcast import SocketsTally, each_socket, operation_of

log = logging.getLogger(__name__)

# A command without a deadline (expires_at unset) may run this long before it counts as FAILED.
_NO_DEADLINE_RUN_S: Final = 30.0


class CommandHandler(Protocol):
    """What the gateway does with a command. Both return False when the node holds no socket
    with this connection id (the outcome is then CONNECTION_GONE), True when done."""

    async def send(self, connection_id: str, data: bytes, data_type: DataType, /) -> bool: ...

    async def disconnect(self, connection_id: str, status_code: int, reason: str, /) -> bool: ...


@runtime_checkable
class FenceHandler(Protocol):
    """A gateway that can act on its fencing (commands.proto, Fenced): start a new incarnation,
    then close every socket of the fenced ones (up to `incarnation`) with FENCED_CLOSE_CODE."""

    async def fenced(self, incarnation: int, /) -> None: ...


@dataclass
class NodeCommandsStats:
    received: int = 0
    """Records of the node's partition read (every node's)."""
    executed: int = 0
    """Commands handed to the handler."""
    duplicates: int = 0
    """Commands read again after they had been acted on; not executed again."""
    other_nodes: int = 0
    """Records for other nodes (or a newer incarnation of this node), skipped."""
    invalid: int = 0
    """Records that were not valid commands, skipped."""
    outcomes: dict[str, int] = field(default_factory=dict)
    """Outcomes published, by status name."""
    outcomes_abandoned: int = 0
    """Outcomes the broker did not acknowledge before the command's deadline or stop()."""
    latency: LatencyTally = field(default_factory=LatencyTally)
    """Seconds from the command's issued_at (the API's clock) to its outcome on the node."""


class CommandExecutor:
    def __init__(
        self,
        handler: CommandHandler,
        node_id: str,
        wall_clock_ns: Callable[[], int],
        stats: NodeCommandsStats,
    ) -> None:
        self._handler = handler
        self._node_id = node_id
        self._wall_clock_ns = wall_clock_ns
        self._stats = stats

    def _outcome(
        self, command: Command, incarnation: int, status: OutcomeStatus, detail: str = ""
    ) -> Outcome:
        self._stats.outcomes[status.name] = self._stats.outcomes.get(status.name, 0) + 1
        completed_at_ns = self._wall_clock_ns()
        self._stats.latency.observe((completed_at_ns - command.issued_at_ns) / 1e9)
        return Outcome(
            command.command_id, self._node_id, incarnation, completed_at_ns, status, detail
        )

    async def execute(self, command: Command, incarnation: int) -> Outcome:
        """What the node does with one command of its own (not a duplicate) and its Outcome."""
        if isinstance(command.action, FenceNotice):
            return await self._fenced(command, incarnation)
        if command.node_incarnation != incarnation:
            return self._outcome(
                command,
                incarnation,
                OutcomeStatus.CONNECTION_GONE,
                f"incarnation {command.node_incarnation} of the node is gone; it is {incarnation}",
            )
        now_ns = self._wall_clock_ns()
        if command.expires_at_ns > 0 and now_ns >= command.expires_at_ns:
            late_ms = (now_ns - command.expires_at_ns) / 1e6
            return self._outcome(
                command,
                incarnation,
                OutcomeStatus.EXPIRED,
                f"read {late_ms:.0f} ms after its deadline",
            )
        budget_s = (
            (command.expires_at_ns - now_ns) / 1e9
            if command.expires_at_ns > 0
            else _NO_DEADLINE_RUN_S
        )
        self._stats.executed += 1
        action = command.action
        if isinstance(action, BroadcastFrame | CloseSockets):
            return await self._many(command, action, incarnation, budget_s)
        try:
            async with asyncio.timeout(budget_s):
                if isinstance(action, SendFrame):
                    held = await self._handler.send(command.connection_id, action.data, action.type)
                else:
                    assert isinstance(action, CloseSocket)
                    held = await self._handler.disconnect(
                        command.connection_id, action.status_code, action.reason
                    )
        except TimeoutError:
            return self._outcome(
                command, incarnation, OutcomeStatus.FAILED, "not done before the deadline"
            )
        except Exception as exc:
            log.warning(
                "event=command_failed command_id=%s connection_id=%s error=%r",
                command.command_id,
                command.connection_id,
                exc,
            )
            return self._outcome(
                command, incarnation, OutcomeStatus.FAILED, f"{type(exc).__name__}: {exc}"[:1000]
            )
        if not held:
            return self._outcome(
                command, incarnation, OutcomeStatus.CONNECTION_GONE, "no such socket on the node"
            )
        return self._outcome(command, incarnation, OutcomeStatus.DONE)

    async def _fenced(self, command: Command, incarnation: int) -> Outcome:
        """A fence of this node's incarnations up to the command's: acted on once, by the
        incarnation it names (an older fence, or one read by a newer start, is done already).
        Not bound by expires_at: a fence is news however late it is read."""
        if command.node_incarnation < incarnation:
            return self._outcome(
                command, incarnation, OutcomeStatus.DONE, f"already at incarnation {incarnation}"
            )
        if not isinstance(self._handler, FenceHandler):
            return self._outcome(
                command, incarnation, OutcomeStatus.FAILED, "this gateway cannot act on a fence"
            )
        self._stats.executed += 1
        log.warning(
            "event=node_fenced node_id=%s incarnation=%d: the lifecycle role took this node for "
            "lost; starting a new incarnation and closing the fenced sockets",
            self._node_id,
            incarnation,
        )
        try:
            await self._handler.fenced(incarnation)
        except Exception as exc:
            log.error("event=fence_not_acted_on node_id=%s error=%r", self._node_id, exc)
            return self._outcome(
                command, incarnation, OutcomeStatus.FAILED, f"{type(exc).__name__}: {exc}"[:1000]
            )
        return self._outcome(command, incarnation, OutcomeStatus.DONE)

    async def _many(
        self, command: Command, action: ManySockets, incarnation: int, budget_s: float
    ) -> Outcome:
        """A command for many sockets (producer/broadcast.py): DONE with how many of the listed
        sockets were done and the ids the node did not hold; FAILED, with the same so far and
        the ids it failed on or had not reached, when an operation raised or the deadline came
        first."""
        tally = SocketsTally()
        detail = ""
        try:
            async with asyncio.timeout(budget_s):
                await each_socket(operation_of(self._handler, action), action.connection_ids, tally)
        except TimeoutError:
            detail = "not done before the deadline"
        if tally.failed_ids and not detail:
            detail = f"{len(tally.failed_ids)} sockets failed, the first: {tally.error}"
            log.warning(
                "event=many_sockets_failed command_id=%s failed=%d error=%r",
                command.command_id,
                len(tally.failed_ids),
                tally.error,
            )
        status = OutcomeStatus.FAILED if detail else OutcomeStatus.DONE
        outcome = self._outcome(command, incarnation, status, detail)
        return replace(
            outcome,
            delivered=tally.done,
            gone=len(tally.gone_ids),
            gone_ids=tuple(tally.gone_ids),
            failed_ids=tuple(tally.failed_ids),
            unreached_ids=tally.unreached(action.connection_ids),
        )
