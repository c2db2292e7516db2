"""Acting on people: Send and Disconnect addressed to a principal, a label selector or a list of
ids, with an outcome for every target (ConnectionDirectoryService.SendToConnections and
DisconnectConnections; docs/api.md, "Acting on people").

The targets are resolved first, whole, before anything is sent: a selector's through the
directory's pages (the same "open" as Get; at most MAX_TARGETS, or the call is refused with
nothing sent), a list's by looking each id up (an id that is not open is answered GONE, or
NODE_LOST when its node's lease ran out). The excepted ids are left out. Then, as a broadcast
does (api/application/broadcast.py), the ids are grouped by the node incarnation holding them
into commands of at most MAX_BROADCAST_IDS ids, each executed once by its node (command ids
`<action_id>.<n>`), and the call waits for their outcomes until its deadline. A node answers
with the ids it did not hold (GONE), failed on (REFUSED) or had not reached (NODE_UNREACHABLE);
every other id of the command was done. A command without an outcome in time leaves its ids
NODE_UNREACHABLE: the action may or may not have happened there, and is never reported DONE.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final

import grpc

from conntrack.api.application.broadcast import Chunker, NoCommandChannel, NodeChunk
from conntrack.api.application.call import ApiError, Call, UndecodableRequest, wait_budget
from conntrack.api.application.commands import (
    CommandChannel,
    CommandChannelUnavailable,
    CommandNotHanded,
)
from conntrack.api.application.directory import (
    MAX_PAGE_SIZE,
    ConnectionDirectory,
    DirectoryUnavailable,
    InvalidDirectoryRequest,
    decoded,
    filter_from_proto,
)
from conntrack.api.application.validation import close_problem, send_problem
from conntrack.api.read.views import DirectoryFilter
from conntrack.core.commands import (
    NORMAL_CLOSURE,
    BroadcastFrame,
    CloseSockets,
    DataType,
    ManySockets,
    Outcome,
    OutcomeStatus,
)
from conntrack.core.ids import id_problem
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2
from conntrack.core.settings import default

# What a chunk of ids becomes: the node's command for them.
_ActionOf = Callable[[tuple[str, ...]], ManySockets]

MAX_LISTED_IDS: Final = 1000
# An answer holds an outcome per target, about 60 bytes each with the longest details: at most
# this many targets keep it within gRPC clients' default receive limit (4 MiB).
MAX_TARGETS: Final = 20_000
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024

Result = directory_pb2.TargetOutcome.Result


class Ending(Enum):
    DONE = Result.DONE
    GONE = Result.GONE
    NODE_LOST = Result.NODE_LOST
    NODE_UNREACHABLE = Result.NODE_UNREACHABLE
    REFUSED = Result.REFUSED


@dataclass(frozen=True, slots=True)
class TargetResult:
    connection_id: str
    ending: Ending
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Selection:
    """Whom to act on: the open connections `where` selects, or the listed ids; minus except."""

    where: DirectoryFilter
    connection_ids: tuple[str, ...] = ()
    except_ids: frozenset[str] = frozenset()


class TooManyTargets(RuntimeError):
    """The selector matches more than MAX_TARGETS connections (FAILED_PRECONDITION)."""


def _ids_problem(name: str, ids: Sequence[str]) -> str | None:
    if len(ids) > MAX_LISTED_IDS:
        return f"{name} must hold at most {MAX_LISTED_IDS} ids, got {len(ids)}"
    for i, cid in enumerate(ids):
        problem = id_problem(f"{name}[{i}]", cid)
        if problem:
            return problem
    if len(set(ids)) != len(ids):
        return f"{name} holds an id twice"
    return None


def selection_from_proto(gateway_id: str, targets: directory_pb2.Targets) -> Selection:
    """Raises InvalidDirectoryRequest naming the first invalid field."""
    where = filter_from_proto(gateway_id, targets.filter)
    ids = tuple(targets.connection_ids)
    problem = _ids_problem("targets.connection_ids", ids) or _ids_problem(
        "targets.except_connection_ids", targets.except_connection_ids
    )
    if problem:
        raise InvalidDirectoryRequest(problem)
    if ids and targets.HasField("filter"):
        raise InvalidDirectoryRequest("targets: give connection_ids or a filter, not both")
    if not ids and where.principal is None and not where.labels:
        raise InvalidDirectoryRequest(
            "targets: name a filter.principal, a filter.label_selector or connection_ids "
            "(to reach every connection of a gateway, use Broadcast)"
        )
    return Selection(where, ids, frozenset(targets.except_connection_ids))


@dataclass(frozen=True, slots=True)
class Targeted:
    action_id: str
    results: list[TargetResult]  # in connection_id order
    freshness: tuple[tuple[str, str], ...]


class TargetedActions:
    """Transport-neutral: InvalidDirectoryRequest for bad input, TooManyTargets, and
    DirectoryUnavailable when the read model does not answer (nothing was sent then),
    NoCommandChannel without a command channel."""

    def __init__(self, directory: ConnectionDirectory, commands: CommandChannel | None) -> None:
        self._directory = directory
        self._commands = commands

    async def send(
        self, selection: Selection, data: bytes, data_type: int, *, timeout_s: float
    ) -> Targeted:
        problem = send_problem(data, data_type)
        if problem:
            raise InvalidDirectoryRequest(problem)
        return await self._act(
            selection, lambda ids: BroadcastFrame(data, DataType(data_type), ids), timeout_s
        )

    async def disconnect(
        self, selection: Selection, status_code: int, reason: str, *, timeout_s: float
    ) -> Targeted:
        problem = close_problem(status_code, reason)
        if problem:
            raise InvalidDirectoryRequest(problem)
        code = status_code or NORMAL_CLOSURE
        return await self._act(selection, lambda ids: CloseSockets(code, reason, ids), timeout_s)

    async def _act(
        self,
        selection: Selection,
        action_of: _ActionOf,
        timeout_s: float,
    ) -> Targeted:
        commands = self._commands
        if commands is None:
            raise NoCommandChannel(
                "this server has no command channel (no Kafka configured for commands)"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        results: dict[str, TargetResult] = {}
        targets, freshness = await self._resolve(selection, results)
        action_id = uuid.uuid4().hex
        chunker = Chunker()
        chunks = [c for c in (chunker.add(*t) for t in targets) if c is not None]
        chunks.extend(chunker.flush())
        tasks = [
            asyncio.create_task(
                commands.execute(
                    node_id=chunk.node_id,
                    node_incarnation=chunk.node_incarnation,
                    connection_id="",
                    action=action_of(chunk.connection_ids),
                    timeout_s=max(deadline - loop.time(), 0.001),
                    command_id=f"{action_id}.{n}",
                )
            )
            for n, chunk in enumerate(chunks, 1)
        ]
        try:
            if tasks:
                await asyncio.wait(tasks)
        finally:
            for task in tasks:  # only when this call itself is cancelled
                task.cancel()
        for chunk, task in zip(chunks, tasks, strict=True):
            for result in _chunk_results(chunk, task):
                results[result.connection_id] = result
        return Targeted(action_id, [results[c] for c in sorted(results)], freshness)

    async def _resolve(
        self, selection: Selection, results: dict[str, TargetResult]
    ) -> tuple[list[tuple[str, int, str]], tuple[tuple[str, str], ...]]:
        """The targets as (node, incarnation, id), in id order; ids already decided (not open,
        or of a gateway without the node role) go into `results`."""
        targets: list[tuple[str, int, str]] = []
        excepted = selection.except_ids
        where = selection.where
        if selection.connection_ids:
            freshness: tuple[tuple[str, str], ...] = ()
            ids = [c for c in selection.connection_ids if c not in excepted]
            for cid, found in (await self._directory.lookup(where.gateway_id, ids)).items():
                if isinstance(found, str):
                    ending = Ending.NODE_LOST if found == "node lost" else Ending.GONE
                    results[cid] = TargetResult(cid, ending, found)
                elif not found.node_id or not found.node_incarnation:
                    results[cid] = TargetResult(cid, Ending.NODE_UNREACHABLE, _NO_NODE_ROLE)
                else:
                    targets.append((found.node_id, found.node_incarnation, cid))
            return sorted(targets, key=lambda t: t[2]), freshness
        token = ""
        freshness = ()
        while True:
            page = await self._directory.list_connections(
                where, page_size=MAX_PAGE_SIZE, page_token=token
            )
            freshness = freshness or page.freshness
            for view in page.connections:
                if view.id in excepted:
                    continue
                if not view.node_id or not view.node_incarnation:
                    results[view.id] = TargetResult(view.id, Ending.NODE_UNREACHABLE, _NO_NODE_ROLE)
                else:
                    targets.append((view.node_id, view.node_incarnation, view.id))
            if len(targets) + len(results) > MAX_TARGETS:
                raise TooManyTargets(
                    f"the targets are more than {MAX_TARGETS} connections; narrow the selector "
                    "(or use Broadcast, which answers with counts)"
                )
            token = page.next_page_token
            if not token:
                return targets, freshness


_NO_NODE_ROLE: Final = "its gateway publishes without the node role: no command reaches it"


def _chunk_results(chunk: NodeChunk, task: asyncio.Task[Outcome]) -> list[TargetResult]:
    ids = chunk.connection_ids
    try:
        outcome = task.result()
    except CommandNotHanded as exc:
        return [TargetResult(c, Ending.NODE_UNREACHABLE, f"not sent: {exc}") for c in ids]
    except CommandChannelUnavailable:
        detail = f"node {chunk.node_id} did not answer in time"
        return [TargetResult(c, Ending.NODE_UNREACHABLE, detail) for c in ids]
    if outcome.status is OutcomeStatus.CONNECTION_GONE:
        return [TargetResult(c, Ending.GONE, outcome.detail) for c in ids]
    if outcome.status is OutcomeStatus.EXPIRED:
        return [TargetResult(c, Ending.NODE_UNREACHABLE, outcome.detail) for c in ids]
    gone, failed = set(outcome.gone_ids), set(outcome.failed_ids)
    unreached = set(outcome.unreached_ids)
    out = []
    for cid in ids:
        if cid in gone:
            out.append(TargetResult(cid, Ending.GONE, "no such socket on the node"))
        elif cid in failed:
            out.append(TargetResult(cid, Ending.REFUSED, outcome.detail))
        elif cid in unreached:
            out.append(TargetResult(cid, Ending.NODE_UNREACHABLE, outcome.detail))
        else:
            out.append(TargetResult(cid, Ending.DONE))
    return out


class TargetedRpc:
    """SendToConnections and DisconnectConnections over TargetedActions (the directory's
    servicer delegates to it)."""

    def __init__(
        self,
        actions: TargetedActions,
        command_timeout_seconds: float = default("api_command_timeout_seconds"),
    ) -> None:
        self._actions = actions
        self._timeout = command_timeout_seconds

    async def send(
        self,
        request: directory_pb2.SendToConnectionsRequest | UndecodableRequest,
        call: Call,
    ) -> directory_pb2.TargetedResponse:
        timeout = wait_budget(call, self._timeout)

        async def act() -> Targeted:
            valid = decoded(request)
            selection = selection_from_proto(valid.gateway_id, valid.targets)
            return await self._actions.send(selection, valid.data, valid.type, timeout_s=timeout)

        return await self._answer(act(), call)

    async def disconnect(
        self,
        request: directory_pb2.DisconnectConnectionsRequest | UndecodableRequest,
        call: Call,
    ) -> directory_pb2.TargetedResponse:
        timeout = wait_budget(call, self._timeout)

        async def act() -> Targeted:
            valid = decoded(request)
            selection = selection_from_proto(valid.gateway_id, valid.targets)
            return await self._actions.disconnect(
                selection, valid.status_code, valid.reason, timeout_s=timeout
            )

        return await self._answer(act(), call)

    async def _answer(
        self, acting: Awaitable[Targeted], call: Call
    ) -> directory_pb2.TargetedResponse:
        try:
            done = await acting
        except InvalidDirectoryRequest as exc:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except TooManyTargets as exc:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        except DirectoryUnavailable as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except NoCommandChannel as exc:
            raise ApiError(grpc.StatusCode.UNIMPLEMENTED, str(exc)) from None
        call.set_trailing_metadata(done.freshness)
        response = directory_pb2.TargetedResponse(action_id=done.action_id)
        counts = dict.fromkeys(Ending, 0)
        for r in done.results:
            counts[r.ending] += 1
        response.outcomes.extend(
            directory_pb2.TargetOutcome(
                connection_id=r.connection_id, result=r.ending.value, detail=r.detail
            )
            for r in done.results
        )
        response.done = counts[Ending.DONE]
        response.gone = counts[Ending.GONE]
        response.node_lost = counts[Ending.NODE_LOST]
        response.node_unreachable = counts[Ending.NODE_UNREACHABLE]
        response.refused = counts[Ending.REFUSED]
        return response
