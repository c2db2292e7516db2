"""Client connections behind a load balancer: a connection older than the maximum age is asked to
reconnect (GOAWAY), so a long-lived client is balanced again, and its next call simply goes over
a new connection; without a maximum age the connection stays. Clients may keep their connections
alive with pings as often as every 10 s without being told off."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from tests.support.directory import serving

pytestmark = [pytest.mark.parametrize("backend", ["sqlite"])]


async def get(channel: grpc.aio.Channel) -> grpc.StatusCode:
    stub = svc_grpc.ConnectionServiceStub(channel)
    try:
        await stub.Get(svc.GetConnectionRequest(connection_id="nobody"), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def state_after(channel: grpc.aio.Channel, seconds: float) -> grpc.ChannelConnectivity:
    await asyncio.sleep(seconds)
    return channel.get_state(try_to_connect=False)


async def test_a_connection_past_its_maximum_age_is_recycled(engine: AsyncEngine) -> None:
    async with serving(
        engine, max_connection_age_seconds=1.0, max_connection_age_grace_seconds=1.0
    ) as server:
        address = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            assert await get(channel) == grpc.StatusCode.NOT_FOUND
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            for _ in range(50):  # 1 s +-10%, then the GOAWAY
                if await state_after(channel, 0.1) != grpc.ChannelConnectivity.READY:
                    break
            assert channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.IDLE
            assert await get(channel) == grpc.StatusCode.NOT_FOUND  # over a new connection
        # Clients that ping every 10 s, calls or not, are served like the others.
        options = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_permit_without_calls", 1)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            assert await get(channel) == grpc.StatusCode.NOT_FOUND


async def test_without_a_maximum_age_a_connection_stays(engine: AsyncEngine) -> None:
    async with (
        serving(engine, max_connection_age_seconds=0) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        assert await get(channel) == grpc.StatusCode.NOT_FOUND
        assert await state_after(channel, 3.0) == grpc.ChannelConnectivity.READY
