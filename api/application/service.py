"""ConnectionService: Get from the read model; Send and Disconnect through the command channel
to the gateway node holding the socket (api/application/commands.py).

Status codes (docs/api.md): INVALID_ARGUMENT for a missing, over-long or undecodable
connection_id, or Send data or type that upstream refuses; NOT_FOUND for unknown, disconnected
and gone connections (and a socket the node no longer holds); UNAVAILABLE when the read model
or the command channel cannot answer in time; FAILED_PRECONDITION for a connection whose gateway
takes no commands; DEADLINE_EXCEEDED when the caller's deadline passes first; UNIMPLEMENTED for
Send and Disconnect on a server without a command channel. No input reaches INTERNAL or
UNKNOWN."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from conntrack.api.application.commands import CommandChannel, CommandChannelUnavailable
from conntrack.api.application.freshness import ProjectionPosition
from conntrack.api.application.validation import send_problem
from conntrack.api.read.reading import SharedReading
from conntrack.api.read.repository import ConnectionRepository, ConnectionView, ReadModelUnavailable
from conntrack.core.commands import (
    Action,
    CloseSocket,
    DataType,
    OutcomeStatus,
    SendFrame,
)
from conntrack.core.ids import upstream_connection_id_problem
from conntrack.core.liveness import Liveness
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_pb2,
    connection_service_pb2,
)
from conntrack.core.settings import default
from conntrack.core.timeutil import to_timestamp

log = logging.getLogger(__name__)

SERVICE: Final = connection_service_pb2.DESCRIPTOR.services_by_name["ConnectionService"]
SERVICE_NAME: Final = SERVICE.full_name

M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class UndecodableRequest:
    """A request body that is not a valid message of the method's request type (e.g. a string
    field holding invalid UTF-8). grpcio would answer UNKNOWN for it; we answer
    INVALID_ARGUMENT."""

    message_type: str
    reason: str


def tolerant_parser(message_type: type[M]) -> Callable[[bytes], M | UndecodableRequest]:
    def parse(data: bytes) -> M | UndecodableRequest:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return UndecodableRequest(message_type.DESCRIPTOR.name, str(exc))

    return parse


def to_proto(view: ConnectionView) -> connection_pb2.Connection:
    return connection_pb2.Connection(
        id=view.id,
        gateway_id=view.gateway_id,
        identity=connection_pb2.Identity(source_ip=view.source_ip, user_agent=view.user_agent),
        connected_at=to_timestamp(view.connected_at_ns),
        last_active_at=to_timestamp(view.last_active_at_ns),
    )


Context = grpc.aio.ServicerContext[object, object]


class ConnectionService:
    """The servicer; register it with tolerant_handlers()."""

    def __init__(
        self,
        repository: ConnectionRepository,
        *,
        db_timeout_seconds: float = default("api_db_timeout_seconds"),
        freshness_ttl_seconds: float = default("api_freshness_ttl_ms") / 1000,
        liveness: Liveness | None = None,
        commands: CommandChannel | None = None,
        command_timeout_seconds: float = default("api_command_timeout_seconds"),
    ) -> None:
        """liveness: when an open connection is gone all the same (its node restarted or went
        silent, idle or lifetime limits); default: the settings' defaults."""
        self._repository = repository
        self._db_timeout = db_timeout_seconds
        self._position = ProjectionPosition(repository, freshness_ttl_seconds)
        self._liveness = liveness or Liveness.of_seconds(
            default("node_lease_seconds"),
            default("connection_idle_timeout_seconds"),
            default("connection_max_lifetime_seconds"),
        )
        # What the log says of the nodes changes with heartbeats (seconds apart) while the
        # lease is tens of seconds: a reading as old as the freshness header's is exact enough.
        self._nodes = SharedReading(repository.nodes, freshness_ttl_seconds)
        self._commands = commands
        self._command_timeout = command_timeout_seconds

    async def Get(
        self,
        request: connection_service_pb2.GetConnectionRequest | UndecodableRequest,
        context: Context,
    ) -> connection_pb2.Connection:
        connection_id = await _valid_id(request, context)
        return to_proto(await self._open_connection(connection_id, context))

    async def _open_connection(self, connection_id: str, context: Context) -> ConnectionView:
        """The connection if it is open and not gone, with the freshness metadata set; else the
        call is aborted (NOT_FOUND, or UNAVAILABLE when the read model cannot answer)."""
        # The caller's deadline is gRPC's to enforce: when it passes, gRPC ends the call with
        # DEADLINE_EXCEEDED and cancels this handler, which abandons the read. A status sent
        # from here as well would race gRPC's own and fail (logged by grpc as an error).
        try:
            async with asyncio.timeout(self._db_timeout):
                # Position first: the header is then a lower bound of what the row reflects.
                freshness = await self._position.metadata()
                view = await self._repository.get_open(connection_id)
                gone = None if view is None else await self._gone(view)
        except TimeoutError:
            log.warning("read model did not answer within %.1fs", self._db_timeout)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"read model did not answer within {self._db_timeout:g}s; retry",
            )
        except ReadModelUnavailable as exc:
            log.warning("read model unavailable: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "read model is unavailable; retry")

        context.set_trailing_metadata(freshness)
        if view is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"connection {connection_id!r} not found (unknown or disconnected)",
            )
        if gone is not None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"connection {connection_id!r} not found (gone: {gone})",
            )
        return view

    async def _gone(self, view: ConnectionView) -> str | None:
        nodes = (await self._nodes.get())[0] if view.node_id else {}
        return self._liveness.gone(
            node_id=view.node_id,
            node_incarnation=view.node_incarnation,
            connected_at_ns=view.connected_at_ns,
            last_active_at_ns=view.last_active_at_ns,
            nodes=nodes,
            now_ns=time.time_ns(),
        )

    async def Send(
        self,
        request: connection_service_pb2.SendToConnectionRequest | UndecodableRequest,
        context: Context,
    ) -> connection_service_pb2.SendToConnectionResponse:
        connection_id = await _valid_id(request, context)
        assert not isinstance(request, UndecodableRequest)
        problem = send_problem(request.data, request.type)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        action = SendFrame(request.data, DataType(request.type))
        await self._command(connection_id, action, context)
        return connection_service_pb2.SendToConnectionResponse()

    async def Disconnect(
        self,
        request: connection_service_pb2.DisconnectRequest | UndecodableRequest,
        context: Context,
    ) -> connection_service_pb2.DisconnectResponse:
        connection_id = await _valid_id(request, context)
        await self._command(connection_id, CloseSocket(), context)
        return connection_service_pb2.DisconnectResponse()

    async def _command(self, connection_id: str, action: Action, context: Context) -> None:
        """Deliver a command to the node holding the connection's socket and map its outcome:
        done is OK, a socket the node no longer holds is NOT_FOUND, no outcome in time (or no
        broker) is UNAVAILABLE, which is retryable (docs/api.md, "Send and Disconnect")."""
        view = await self._open_connection(connection_id, context)
        if self._commands is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "this server has no command channel (no Kafka configured for commands)",
            )
        if not view.node_id or not view.node_incarnation:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"connection {connection_id!r} is held by a gateway that does not take "
                "commands (it publishes without the node role)",
            )
        # Our own wait ends a little before the caller's deadline, so the answer is ours
        # (UNAVAILABLE) and not a race with gRPC's DEADLINE_EXCEEDED.
        remaining = context.time_remaining()
        timeout = self._command_timeout
        if remaining is not None:
            timeout = min(timeout, remaining - _DEADLINE_MARGIN_S)
        if timeout <= 0:
            timeout = max(remaining or 0.0, 0.001)  # gRPC's deadline ends the call first
        try:
            outcome = await self._commands.execute(
                node_id=view.node_id,
                node_incarnation=view.node_incarnation,
                connection_id=connection_id,
                action=action,
                timeout_s=timeout,
            )
        except CommandChannelUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; retry")
        if outcome.status is OutcomeStatus.DONE:
            return
        if outcome.status is OutcomeStatus.CONNECTION_GONE:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"connection {connection_id!r} not found (its gateway node no longer holds it)",
            )
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"gateway node {view.node_id} answered {outcome.status.name.lower()}"
            f"{': ' + outcome.detail if outcome.detail else ''}; retry",
        )


# How much of the caller's deadline a Send or Disconnect leaves for its own answer.
_DEADLINE_MARGIN_S = 0.25


async def _valid_id(
    request: Any,
    context: Context,
) -> str:
    """The request's connection_id, or the call aborted with INVALID_ARGUMENT."""
    if isinstance(request, UndecodableRequest):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request is not a valid {request.message_type} "
            f"(connection_id must be valid UTF-8): {request.reason}",
        )
    connection_id = str(request.connection_id)
    problem = upstream_connection_id_problem(connection_id)
    if problem:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
    return connection_id


def tolerant_handlers(
    servicer: object, service: ServiceDescriptor
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The method handlers of one service, as its generated add_*Servicer_to_server registers
    them (the servicer's method of each RPC's name), but with request parsers that turn
    undecodable bodies into INVALID_ARGUMENT."""
    return {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=tolerant_parser(GetMessageClass(method.input_type)),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
        for method in service.methods
    }
