"""Broadcast: one message to every open connection of a gateway (with the directory's filters),
fanned out by the gateway nodes holding them (ConnectionDirectoryService.Broadcast; docs/api.md,
"Broadcast").

The API pages through the connection directory (api/application/directory.py: keyset order, the same
"open" as Get), groups the connection ids by the node (and incarnation) holding them, and hands each
node commands carrying the frame and a chunk of its ids (core/commands.py,
BroadcastFrame: at most MAX_BROADCAST_IDS ids and MAX_IDS_BYTES of them, so a command stays
well below Kafka's 1 MB message limit). Commands go out while later pages are read; the call
then waits for their outcomes until its deadline.

Semantics: at most once per connection per broadcast. Each command has its own id
(`<broadcast_id>.<n>`), and a node executes a command id once (producer/commands.py remembers
them), so a redelivered command writes nothing twice; the same connection is in one command
only (the listing is keyset-paged: a connection is listed once).

The answer: `addressed`, the connections in commands handed to the broker; `delivered`, the
sockets the nodes wrote the frame to, by the outcomes that arrived; `complete` when every
command's outcome arrived (delivered is then final) and the whole listing was read;
`unreachable`, matching connections held by gateways without the node role (no command reaches
them)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

import grpc

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
from conntrack.api.application.validation import send_problem
from conntrack.api.read.repository import DirectoryFilter
from conntrack.core.commands import (
    MAX_BROADCAST_IDS,
    BroadcastFrame,
    DataType,
    Outcome,
)
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2
from conntrack.core.settings import default

# The connection ids' share of one command (their UTF-8 bytes and 3 bytes of protobuf framing
# each); with the frame (at most 128 KiB) and the envelope, a command stays below 700 KB.
MAX_IDS_BYTES: Final = 512 * 1024
_ID_OVERHEAD: Final = 3


@dataclass(frozen=True, slots=True)
class NodeChunk:
    """One broadcast command's addressees: connections of one node incarnation."""

    node_id: str
    node_incarnation: int
    connection_ids: tuple[str, ...]


@dataclass
class _Pending:
    ids: list[str] = field(default_factory=list)
    size: int = 0


class Chunker:
    """Groups connection ids by node incarnation into chunks of at most `max_ids` ids and
    `max_bytes` bytes of ids, handing out each chunk as soon as it is full. Pure."""

    def __init__(self, max_ids: int = MAX_BROADCAST_IDS, max_bytes: int = MAX_IDS_BYTES) -> None:
        if max_ids < 1 or max_bytes < 1:
            raise ValueError("max_ids and max_bytes must be positive")
        self._max_ids = max_ids
        self._max_bytes = max_bytes
        self._pending: dict[tuple[str, int], _Pending] = {}

    def add(self, node_id: str, node_incarnation: int, connection_id: str) -> NodeChunk | None:
        """Add one connection; returns a full chunk when this connection does not fit in the
        node's current one (that chunk, without it) or fills it (with it)."""
        key = (node_id, node_incarnation)
        size = len(connection_id.encode()) + _ID_OVERHEAD
        pending = self._pending.setdefault(key, _Pending())
        out = None
        if pending.ids and pending.size + size > self._max_bytes:
            out = NodeChunk(node_id, node_incarnation, tuple(pending.ids))
            pending = self._pending[key] = _Pending()
        pending.ids.append(connection_id)
        pending.size += size
        if out is None and len(pending.ids) >= self._max_ids:
            out = NodeChunk(node_id, node_incarnation, tuple(pending.ids))
            del self._pending[key]
        return out

    def flush(self) -> Iterator[NodeChunk]:
        """The chunks not yet handed out (each node's last); the chunker is empty after."""
        pending, self._pending = self._pending, {}
        for (node_id, incarnation), chunk in pending.items():
            if chunk.ids:
                yield NodeChunk(node_id, incarnation, tuple(chunk.ids))


@dataclass(frozen=True, slots=True)
class BroadcastResult:
    broadcast_id: str
    addressed: int
    delivered: int
    complete: bool
    unreachable: int
    commands: int  # commands handed to the broker
    freshness: tuple[tuple[str, str], ...]  # the first page's, as the directory sends it


class NoCommandChannel(RuntimeError):
    """This server has no command channel (UNIMPLEMENTED, 501 over HTTP)."""


class Broadcaster:
    """Transport-neutral: raises InvalidDirectoryRequest for bad input, DirectoryUnavailable
    when the read model or the command channel cannot take the broadcast before anything was
    sent (retrying is then safe), NoCommandChannel without a command channel."""

    def __init__(self, directory: ConnectionDirectory, commands: CommandChannel | None) -> None:
        self._directory = directory
        self._commands = commands

    async def broadcast(
        self, where: DirectoryFilter, data: bytes, data_type: int, *, timeout_s: float
    ) -> BroadcastResult:
        problem = send_problem(data, data_type)
        if problem:
            raise InvalidDirectoryRequest(problem)
        commands = self._commands
        if commands is None:
            raise NoCommandChannel(
                "this server has no command channel (no Kafka configured for commands)"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        broadcast_id = uuid.uuid4().hex
        frame_type = DataType(data_type)
        sent: list[tuple[NodeChunk, asyncio.Task[Outcome]]] = []

        def hand_out(chunk: NodeChunk) -> None:
            task = asyncio.create_task(
                commands.execute(
                    node_id=chunk.node_id,
                    node_incarnation=chunk.node_incarnation,
                    connection_id="",
                    action=BroadcastFrame(data, frame_type, chunk.connection_ids),
                    timeout_s=max(deadline - loop.time(), 0.001),
                    command_id=f"{broadcast_id}.{len(sent) + 1}",
                )
            )
            sent.append((chunk, task))

        chunker = Chunker()
        unreachable = 0
        listed_all = False
        freshness: tuple[tuple[str, str], ...] = ()
        token = ""
        try:
            while True:
                try:
                    page = await self._directory.list_connections(
                        where, page_size=MAX_PAGE_SIZE, page_token=token
                    )
                except DirectoryUnavailable:
                    if not sent:
                        raise
                    break  # some commands are out: answer what they did, incomplete
                freshness = freshness or page.freshness
                for view in page.connections:
                    if not view.node_id or not view.node_incarnation:
                        unreachable += 1
                        continue
                    chunk = chunker.add(view.node_id, view.node_incarnation, view.id)
                    if chunk is not None:
                        hand_out(chunk)
                token = page.next_page_token
                if not token:
                    listed_all = True
                    break
                if loop.time() >= deadline:
                    break
            if listed_all:
                for chunk in chunker.flush():
                    hand_out(chunk)
            return await self._outcomes(broadcast_id, sent, listed_all, unreachable, freshness)
        finally:
            for _, task in sent:  # only when this call itself is cancelled
                task.cancel()

    async def _outcomes(
        self,
        broadcast_id: str,
        sent: list[tuple[NodeChunk, asyncio.Task[Outcome]]],
        listed_all: bool,
        unreachable: int,
        freshness: tuple[tuple[str, str], ...],
    ) -> BroadcastResult:
        addressed = delivered = handed = 0
        complete = listed_all
        not_handed: CommandNotHanded | None = None
        if sent:
            await asyncio.wait([task for _, task in sent])
        for chunk, task in sent:
            try:
                outcome = task.result()
            except CommandNotHanded as exc:
                not_handed = not_handed or exc
                complete = False
                continue
            except CommandChannelUnavailable:  # handed, but no outcome in time
                complete = False
            else:
                delivered += outcome.delivered
            handed += 1
            addressed += len(chunk.connection_ids)
        if sent and not handed:
            # Nothing reached the broker: safe to retry.
            raise DirectoryUnavailable(f"{not_handed}; retry")
        return BroadcastResult(
            broadcast_id, addressed, delivered, complete, unreachable, handed, freshness
        )


class BroadcastRpc:
    """ConnectionDirectoryService.Broadcast over a Broadcaster (api/application/directory.py's
    servicer delegates to it): INVALID_ARGUMENT for bad input, UNAVAILABLE when nothing could be
    sent, UNIMPLEMENTED without a command channel."""

    def __init__(
        self,
        broadcaster: Broadcaster,
        command_timeout_seconds: float = default("api_command_timeout_seconds"),
    ) -> None:
        self._broadcaster = broadcaster
        self._timeout = command_timeout_seconds

    async def __call__(
        self,
        request: directory_pb2.BroadcastRequest | UndecodableRequest,
        call: Call,
    ) -> directory_pb2.BroadcastResponse:
        timeout = wait_budget(call, self._timeout)
        try:
            request = decoded(request)
            where = filter_from_proto(request.gateway_id, request.filter)
            result = await self._broadcaster.broadcast(
                where, request.data, request.type, timeout_s=timeout
            )
        except InvalidDirectoryRequest as exc:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except DirectoryUnavailable as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except NoCommandChannel as exc:
            raise ApiError(grpc.StatusCode.UNIMPLEMENTED, str(exc)) from None
        call.set_trailing_metadata(result.freshness)
        return directory_pb2.BroadcastResponse(
            broadcast_id=result.broadcast_id,
            addressed=result.addressed,
            delivered=result.delivered,
            complete=result.complete,
            unreachable=result.unreachable,
        )
