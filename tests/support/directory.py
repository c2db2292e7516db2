"""The connection directory's test helpers: a server over a read model, a channel to it, and
requests and listings of its pages."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.read.repository import ConnectionRepository
from conntrack.api.transport.server import ApiServer
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2 as pb
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2_grpc as pb_grpc


@contextlib.asynccontextmanager
async def serving(engine: AsyncEngine, **options: Any) -> AsyncIterator[ApiServer]:
    options.setdefault("freshness_ttl_seconds", 0)
    async with ApiServer(ConnectionRepository(engine), "127.0.0.1:0", **options) as server:
        yield server


@contextlib.asynccontextmanager
async def channel_to(server: ApiServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


def request(
    gateway: str, size: int = 0, token: str = "", **filters: Any
) -> pb.ListConnectionsRequest:
    return pb.ListConnectionsRequest(
        gateway_id=gateway, page_size=size, page_token=token, filter=pb.ConnectionFilter(**filters)
    )


async def list_all(
    stub: pb_grpc.ConnectionDirectoryServiceStub, gateway: str, size: int, **filters: Any
) -> list[pb.DirectoryEntry]:
    entries: list[pb.DirectoryEntry] = []
    token = ""
    while True:
        page = await stub.ListConnections(request(gateway, size, token, **filters), timeout=30)
        assert len(page.connections) <= size
        entries.extend(page.connections)
        if not page.next_page_token:
            return entries
        token = page.next_page_token


def ids(entries: Iterable[pb.DirectoryEntry]) -> list[str]:
    return [e.connection.id for e in entries]


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value
