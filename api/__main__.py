"""conntrack-api: serve ConnectionService (`serve`), or fetch one connection as JSON (`get`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToJson

from api.auth import TokenConfigError
from api.repository import ConnectionRepository, create_read_engine
from api.server import ApiServer
from api.tls import TlsConfigError, client_credentials
from connection_tracker.lifecycle import (
    PYTHON_GEN0_THRESHOLD,
    on_shutdown_signal,
    setup_logging,
    tune_gc,
)
from connection_tracker.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2,
    connection_service_pb2_grpc,
)
from connection_tracker.settings import Settings, settings_from

log = logging.getLogger("api")


async def serve(settings: Settings) -> int:
    engine = create_read_engine(
        settings.database_url,
        pool_size=settings.api_db_pool_size,
        timeout_seconds=settings.api_db_timeout_seconds,
    )
    try:
        try:
            repository = ConnectionRepository(
                engine,
                batch_max_ids=settings.api_batch_max_ids,
                batch_max_in_flight=settings.api_batch_max_in_flight,
                batch_window_seconds=settings.api_batch_window_ms / 1000,
            )
            server = ApiServer.from_settings(repository, settings)
            await server.start()
        except (TlsConfigError, TokenConfigError, OSError) as exc:
            log.error("cannot start: %s", exc)
            return 2
        on_shutdown_signal(server.stop)
        await server.wait()
        return 0
    finally:
        await engine.dispose()


def _token(ns: argparse.Namespace, settings: Settings) -> str | None:
    if ns.token_file is not None:
        return Path(ns.token_file).read_text(encoding="utf-8").strip()
    if settings.api_client_token is not None:
        return settings.api_client_token.get_secret_value()
    return None


async def get(ns: argparse.Namespace, settings: Settings) -> int:
    target = ns.target or settings.api_listen
    token = _token(ns, settings)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    if ns.tls or ns.tls_ca or ns.tls_cert:
        options = (
            [("grpc.ssl_target_name_override", ns.tls_server_name)] if ns.tls_server_name else []
        )
        credentials = client_credentials(ns.tls_ca, ns.tls_cert, ns.tls_key)
        channel = grpc.aio.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.aio.insecure_channel(target)
    async with channel:
        stub = connection_service_pb2_grpc.ConnectionServiceStub(channel)
        call = stub.Get(
            connection_service_pb2.GetConnectionRequest(connection_id=ns.connection_id),
            timeout=ns.timeout,
            metadata=metadata,
        )
        try:
            answer = await call
        except grpc.aio.AioRpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        trailing = await call.trailing_metadata()
    print(MessageToJson(answer, indent=2, always_print_fields_with_no_presence=True))
    if ns.verbose:
        for key, value in trailing or ():
            if key.startswith("x-projection"):
                print(f"{key}: {value!s}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="conntrack-api", description=__doc__)
    parser.add_argument("--database-url", help="overrides CONNTRACK_DATABASE_URL")
    parser.add_argument("--listen", help="overrides CONNTRACK_API_LISTEN")
    parser.add_argument("--metrics-port", type=int, help="overrides CONNTRACK_METRICS_PORT")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the gRPC server until SIGTERM/SIGINT")
    g = sub.add_parser("get", help="call Get on a running server and print the answer as JSON")
    g.add_argument("connection_id")
    g.add_argument("--target", help="server address (default: CONNTRACK_API_LISTEN)")
    g.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    g.add_argument("--tls", action="store_true", help="use TLS with the system's CA roots")
    g.add_argument("--tls-ca", type=Path, help="CA file to trust (implies --tls)")
    g.add_argument("--tls-cert", type=Path, help="client certificate for mutual TLS")
    g.add_argument("--tls-key", type=Path, help="client key for mutual TLS")
    g.add_argument("--tls-server-name", help="expected server name, if not the target's host")
    g.add_argument(
        "--token-file",
        type=Path,
        help="file holding the bearer token (default: CONNTRACK_API_CLIENT_TOKEN)",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="print freshness headers to stderr")
    ns = parser.parse_args(argv)
    settings = settings_from(
        database_url=ns.database_url,
        api_listen=ns.listen,
        metrics_port=ns.metrics_port,
    )
    setup_logging(settings.log_level)
    tune_gc(settings.gc_gen0_threshold, default=PYTHON_GEN0_THRESHOLD)
    if ns.command == "serve":
        sys.exit(asyncio.run(serve(settings)))
    try:
        sys.exit(asyncio.run(get(ns, settings)))
    except (TlsConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
