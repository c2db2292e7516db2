"""ConnectionService: Get from the read model; Send and Disconnect are not this tracker's job.

Status codes (docs/api.md): INVALID_ARGUMENT for a missing, over-long or undecodable
connection_id; NOT_FOUND for unknown and disconnected connections; UNAVAILABLE when the read
model cannot answer; DEADLINE_EXCEEDED when the caller's deadline passes first; UNIMPLEMENTED
for Send and Disconnect. No input reaches INTERNAL or UNKNOWN."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from api.freshness import ProjectionPosition
from api.reading import SharedReading
from api.repository import ConnectionRepository, ConnectionView, ReadModelUnavailable
from api.validation import connection_id_problem
from connection_tracker.liveness import Liveness
from connection_tracker.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_pb2,
    connection_service_pb2,
)
from connection_tracker.settings import default
from connection_tracker.timeutil import to_timestamp

log = logging.getLogger(__name__)

SERVICE_NAME: Final = connection_service_pb2.DESCRIPTOR.services_by_name[
    "ConnectionService"
].full_name

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
    """The servicer; register it with connection_service_handlers()."""

    def __init__(
        self,
        repository: ConnectionRepository,
        *,
        db_timeout_seconds: float = default("api_db_timeout_seconds"),
        freshness_ttl_seconds: float = default("api_freshness_ttl_ms") / 1000,
        liveness: Liveness | None = None,
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

    async def Get(
        self,
        request: connection_service_pb2.GetConnectionRequest | UndecodableRequest,
        context: Context,
    ) -> connection_pb2.Connection:
        if isinstance(request, UndecodableRequest):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request is not a valid {request.message_type} "
                f"(connection_id must be valid UTF-8): {request.reason}",
            )
        problem = connection_id_problem(request.connection_id)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)

        # The caller's deadline is gRPC's to enforce: when it passes, gRPC ends the call with
        # DEADLINE_EXCEEDED and cancels this handler, which abandons the read. A status sent
        # from here as well would race gRPC's own and fail (logged by grpc as an error).
        try:
            async with asyncio.timeout(self._db_timeout):
                # Position first: the header is then a lower bound of what the row reflects.
                freshness = await self._position.metadata()
                view = await self._repository.get_open(request.connection_id)
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
                f"connection {request.connection_id!r} not found (unknown or disconnected)",
            )
        if gone is not None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"connection {request.connection_id!r} not found (gone: {gone})",
            )
        return to_proto(view)

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
        self, request: object, context: Context
    ) -> connection_service_pb2.SendToConnectionResponse:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "Send is not supported: this service tracks connections, it does not carry their "
            "data; send through the API gateway itself",
        )

    async def Disconnect(
        self, request: object, context: Context
    ) -> connection_service_pb2.DisconnectResponse:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "Disconnect is not supported: this service tracks connections, it cannot close "
            "them; disconnect through the API gateway itself",
        )


def connection_service_handlers(
    service: ConnectionService,
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """Method handlers like the generated add_ConnectionServiceServicer_to_server registers,
    but with request parsers that turn undecodable bodies into INVALID_ARGUMENT."""
    svc = connection_service_pb2
    return {
        "Get": grpc.unary_unary_rpc_method_handler(
            service.Get,
            request_deserializer=tolerant_parser(svc.GetConnectionRequest),
            response_serializer=connection_pb2.Connection.SerializeToString,
        ),
        "Send": grpc.unary_unary_rpc_method_handler(
            service.Send,
            request_deserializer=tolerant_parser(svc.SendToConnectionRequest),
            response_serializer=svc.SendToConnectionResponse.SerializeToString,
        ),
        "Disconnect": grpc.unary_unary_rpc_method_handler(
            service.Disconnect,
            request_deserializer=tolerant_parser(svc.DisconnectRequest),
            response_serializer=svc.DisconnectResponse.SerializeToString,
        ),
    }
