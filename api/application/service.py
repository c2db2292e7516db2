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
from typing import Any, Final

import grpc

from conntrack.api.application.call import (
    ApiError,
    Call,
    UndecodableRequest,
    reject_undecodable,
    wait_budget,
)
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


def to_proto(view: ConnectionView) -> connection_pb2.Connection:
    return connection_pb2.Connection(
        id=view.id,
        gateway_id=view.gateway_id,
        identity=connection_pb2.Identity(source_ip=view.source_ip, user_agent=view.user_agent),
        connected_at=to_timestamp(view.connected_at_ns),
        last_active_at=to_timestamp(view.last_active_at_ns),
    )


class ConnectionService:
    """ConnectionService's methods over a Call, whichever transport carries it (registered by
    api/transport/grpc_handlers.py and api/transport/rest.py)."""

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
        call: Call,
    ) -> connection_pb2.Connection:
        connection_id = _valid_id(request)
        return to_proto(await self._open_connection(connection_id, call))

    async def _open_connection(self, connection_id: str, call: Call) -> ConnectionView:
        """The connection if it is open and not gone, with the freshness metadata set; else
        ApiError (NOT_FOUND, or UNAVAILABLE when the read model cannot answer)."""
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
            raise ApiError(
                grpc.StatusCode.UNAVAILABLE,
                f"read model did not answer within {self._db_timeout:g}s; retry",
            ) from None
        except ReadModelUnavailable as exc:
            log.warning("read model unavailable: %s", exc)
            raise ApiError(
                grpc.StatusCode.UNAVAILABLE, "read model is unavailable; retry"
            ) from None

        call.set_trailing_metadata(freshness)
        if view is None:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND,
                f"connection {connection_id!r} not found (unknown or disconnected)",
            )
        if gone is not None:
            raise ApiError(
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
        call: Call,
    ) -> connection_service_pb2.SendToConnectionResponse:
        connection_id = _valid_id(request)
        assert not isinstance(request, UndecodableRequest)
        problem = send_problem(request.data, request.type)
        if problem:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, problem)
        action = SendFrame(request.data, DataType(request.type))
        await self._command(connection_id, action, call)
        return connection_service_pb2.SendToConnectionResponse()

    async def Disconnect(
        self,
        request: connection_service_pb2.DisconnectRequest | UndecodableRequest,
        call: Call,
    ) -> connection_service_pb2.DisconnectResponse:
        connection_id = _valid_id(request)
        await self._command(connection_id, CloseSocket(), call)
        return connection_service_pb2.DisconnectResponse()

    async def _command(self, connection_id: str, action: Action, call: Call) -> None:
        """Deliver a command to the node holding the connection's socket and map its outcome:
        done is OK, a socket the node no longer holds is NOT_FOUND, no outcome in time (or no
        broker) is UNAVAILABLE, which is retryable (docs/api.md, "Send and Disconnect")."""
        view = await self._open_connection(connection_id, call)
        if self._commands is None:
            raise ApiError(
                grpc.StatusCode.UNIMPLEMENTED,
                "this server has no command channel (no Kafka configured for commands)",
            )
        if not view.node_id or not view.node_incarnation:
            raise ApiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"connection {connection_id!r} is held by a gateway that does not take "
                "commands (it publishes without the node role)",
            )
        timeout = wait_budget(call, self._command_timeout)
        try:
            outcome = await self._commands.execute(
                node_id=view.node_id,
                node_incarnation=view.node_incarnation,
                connection_id=connection_id,
                action=action,
                timeout_s=timeout,
            )
        except CommandChannelUnavailable as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, f"{exc}; retry") from None
        if outcome.status is OutcomeStatus.DONE:
            return
        if outcome.status is OutcomeStatus.CONNECTION_GONE:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND,
                f"connection {connection_id!r} not found (its gateway node no longer holds it)",
            )
        raise ApiError(
            grpc.StatusCode.UNAVAILABLE,
            f"gateway node {view.node_id} answered {outcome.status.name.lower()}"
            f"{': ' + outcome.detail if outcome.detail else ''}; retry",
        )


def _valid_id(request: Any) -> str:
    """The request's connection_id, or ApiError INVALID_ARGUMENT."""
    if isinstance(request, UndecodableRequest):
        raise reject_undecodable(request, "connection_id must be valid UTF-8")
    connection_id = str(request.connection_id)
    problem = upstream_connection_id_problem(connection_id)
    if problem:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, problem)
    return connection_id
