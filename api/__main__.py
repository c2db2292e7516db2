"""conntrack-api: serve ConnectionService (`serve`), or fetch one connection as JSON (`get`)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from google.protobuf.json_format import MessageToJson

from api.repository import ConnectionRepository
from api.server import ApiServer
from connection_tracker.database import create_engine
from connection_tracker.lifecycle import on_shutdown_signal, setup_logging
from connection_tracker.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2,
    connection_service_pb2_grpc,
)
from connection_tracker.settings import Settings


async def serve(settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    try:
        server = ApiServer(ConnectionRepository(engine), settings.api_listen)
        async with server:
            on_shutdown_signal(server.stop)
            await server.wait()
    finally:
        await engine.dispose()


async def get(target: str, connection_id: str, timeout: float) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = connection_service_pb2_grpc.ConnectionServiceStub(channel)
        try:
            answer = await stub.Get(
                connection_service_pb2.GetConnectionRequest(connection_id=connection_id),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(MessageToJson(answer, preserving_proto_field_name=False, indent=2))
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="conntrack-api", description=__doc__)
    parser.add_argument("--database-url", help="overrides CONNTRACK_DATABASE_URL")
    parser.add_argument("--listen", help="overrides CONNTRACK_API_LISTEN")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the gRPC server until SIGTERM/SIGINT")
    g = sub.add_parser("get", help="call Get on a running server and print the answer as JSON")
    g.add_argument("connection_id")
    g.add_argument("--target", help="server address (default: CONNTRACK_API_LISTEN)")
    g.add_argument("--timeout", type=float, default=5.0)
    ns = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in {"database_url": ns.database_url, "api_listen": ns.listen}.items()
        if v is not None
    }
    settings = Settings(**overrides)
    setup_logging(settings.log_level)
    if ns.command == "serve":
        asyncio.run(serve(settings))
    else:
        sys.exit(asyncio.run(get(ns.target or settings.api_listen, ns.connection_id, ns.timeout)))


if __name__ == "__main__":
    main()
