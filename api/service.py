"""ConnectionService: Get from the read model; Send and Disconnect are not this tracker's job."""

from __future__ import annotations

import logging

import grpc

from api.repository import ConnectionRepository, ConnectionView, ReadModelUnavailable
from connection_tracker.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_pb2,
    connection_service_pb2,
    connection_service_pb2_grpc,
)
from connection_tracker.timeutil import to_timestamp

log = logging.getLogger(__name__)

MAX_CONNECTION_ID_LENGTH = 50


def validate_connection_id(connection_id: str) -> str | None:
    """The upstream rule for every connection_id: required, at most 50 characters."""
    if not connection_id:
        return "connection_id is required"
    if len(connection_id) > MAX_CONNECTION_ID_LENGTH:
        return f"connection_id must be at most {MAX_CONNECTION_ID_LENGTH} characters"
    return None


def to_proto(view: ConnectionView) -> connection_pb2.Connection:
    return connection_pb2.Connection(
        id=view.id,
        gateway_id=view.gateway_id,
        identity=connection_pb2.Identity(source_ip=view.source_ip, user_agent=view.user_agent),
        connected_at=to_timestamp(view.connected_at_ns),
        last_active_at=to_timestamp(view.last_active_at_ns),
    )


class ConnectionService(connection_service_pb2_grpc.ConnectionServiceServicer):
    def __init__(self, repository: ConnectionRepository) -> None:
        self._repository = repository

    async def Get(  # noqa: N802 (gRPC method name)
        self,
        request: connection_service_pb2.GetConnectionRequest,
        context: grpc.aio.ServicerContext[
            connection_service_pb2.GetConnectionRequest, connection_pb2.Connection
        ],
    ) -> connection_pb2.Connection:
        problem = validate_connection_id(request.connection_id)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            view = await self._repository.get_open(request.connection_id)
        except ReadModelUnavailable as exc:
            log.warning("read model unavailable: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "read model is unavailable; retry")
        if view is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"connection {request.connection_id} not found"
            )
        return to_proto(view)

    async def Send(  # noqa: N802
        self,
        request: connection_service_pb2.SendToConnectionRequest,
        context: grpc.aio.ServicerContext[
            connection_service_pb2.SendToConnectionRequest,
            connection_service_pb2.SendToConnectionResponse,
        ],
    ) -> connection_service_pb2.SendToConnectionResponse:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "Send is not supported: this service tracks connections, it does not carry their data",
        )

    async def Disconnect(  # noqa: N802
        self,
        request: connection_service_pb2.DisconnectRequest,
        context: grpc.aio.ServicerContext[
            connection_service_pb2.DisconnectRequest, connection_service_pb2.DisconnectResponse
        ],
    ) -> connection_service_pb2.DisconnectResponse:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "Disconnect is not supported: this service tracks connections, it cannot close them",
        )
