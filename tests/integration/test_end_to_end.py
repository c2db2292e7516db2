"""Publish -> project -> Get, on the real broker, once per read-model backend."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.read.repository import ConnectionRepository
from conntrack.api.transport.server import ApiServer
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.core.timeutil import to_ns
from conntrack.producer.publisher import Publisher
from conntrack.projector.runner import Projector

pytestmark = [pytest.mark.kafka]


@contextlib.asynccontextmanager
async def running_projector(settings: Settings, engine: AsyncEngine) -> AsyncIterator[Projector]:
    projector = Projector(settings, ProjectionStore(engine))
    async with projector:
        task = asyncio.create_task(projector.run())
        try:
            yield projector
        finally:
            await projector.stop()
            await asyncio.wait_for(task, 30)


async def get_until_found(
    stub: svc_grpc.ConnectionServiceStub, connection_id: str, patience: float = 30.0
) -> object:
    deadline = asyncio.get_running_loop().time() + patience
    while True:
        try:
            return await stub.Get(svc.GetConnectionRequest(connection_id=connection_id), timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_published_connection_is_served_with_exact_fields(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    async with (
        Publisher(
            kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic, "gw-1"
        ) as pub,
        running_projector(kafka_settings, engine),
        ApiServer(ConnectionRepository(engine), "127.0.0.1:0") as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = svc_grpc.ConnectionServiceStub(channel)
        connected = await pub.connected(
            "conn-e2e-1",
            "2001:db8::7",
            "Mozilla/5.0 (X11; Linux x86_64) test",
            at_ns=1_764_300_000_123_456_789,
        )
        await pub.activity("conn-e2e-1", at_ns=1_764_300_005_987_654_321)
        await pub.connected("conn-e2e-2", "10.1.2.3", "okhttp/4.12.0")
        await pub.disconnected("conn-e2e-2", status_code=1001, reason="going away")
        await pub.flush()

        answer = await get_until_found(stub, "conn-e2e-1")
        assert answer.id == "conn-e2e-1"  # type: ignore[attr-defined]
        assert answer.gateway_id == "gw-1"  # type: ignore[attr-defined]
        assert answer.identity.source_ip == "2001:db8::7"  # type: ignore[attr-defined]
        assert answer.identity.user_agent == "Mozilla/5.0 (X11; Linux x86_64) test"  # type: ignore[attr-defined]
        assert to_ns(answer.connected_at) == connected.occurred_at_ns  # type: ignore[attr-defined]
        # Activity may still be in flight when the Connected is first visible.
        for _ in range(100):
            answer = await get_until_found(stub, "conn-e2e-1")
            if to_ns(answer.last_active_at) == 1_764_300_005_987_654_321:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.1)
        assert to_ns(answer.last_active_at) == 1_764_300_005_987_654_321  # type: ignore[attr-defined]

        # Disconnected connections no longer exist: NOT_FOUND once the projector has them.
        store = ProjectionStore(engine)
        for _ in range(300):
            state = await store.get("conn-e2e-2")
            if state is not None and state.disconnected_at_ns is not None:
                break
            await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Get(svc.GetConnectionRequest(connection_id="conn-e2e-2"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Get(svc.GetConnectionRequest(connection_id="never-seen"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
