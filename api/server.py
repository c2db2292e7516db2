"""The gRPC server's lifecycle: ConnectionService, health checking that follows the read
model's readiness, server reflection (grpcurl works without .proto files), graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from api.repository import ConnectionRepository
from api.service import ConnectionService
from connection_tracker.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2,
    connection_service_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAME = connection_service_pb2.DESCRIPTOR.services_by_name["ConnectionService"].full_name


class ApiServer:
    """Async context manager around grpc.aio.Server; start() and stop() are idempotent."""

    def __init__(
        self,
        repository: ConnectionRepository,
        listen: str,
        *,
        grace_seconds: float = 5.0,
        health_interval_seconds: float = 2.0,
    ) -> None:
        self._repository = repository
        self._listen = listen
        self._grace = grace_seconds
        self._health_interval = health_interval_seconds
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._health_task: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self) -> None:
        if self._server is not None:
            return
        server = grpc.aio.server()
        connection_service_pb2_grpc.add_ConnectionServiceServicer_to_server(
            ConnectionService(self._repository), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_insecure_port(self._listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self._listen}")
        await self._update_health()
        await server.start()
        self._server = server
        self._health_task = asyncio.create_task(self._watch_health())
        log.info("serving %s on %s", SERVICE_NAME, self._listen)

    async def _update_health(self) -> None:
        ok = await self._repository.ping()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval)
            await self._update_health()

    async def stop(self) -> None:
        """Stop accepting calls, let in-flight calls finish within the grace period."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await self._health.enter_graceful_shutdown()
        await server.stop(self._grace)
        log.info("stopped")

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
