"""The command-line client of a running server: `conntrack-api get | send | disconnect` make one
call and print the answer as JSON."""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToJson
from google.protobuf.message import Message

from conntrack.api.transport.tls import client_credentials
from conntrack.core import cli
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2,
    connection_service_pb2_grpc,
)
from conntrack.core.settings import Settings

# What a failed call means for the exit code: a dependency (the server, its database, the
# command channel to the gateway node) that could not be reached is 69; any other answer is a
# negative one.
_CALL_EXIT = {
    grpc.StatusCode.UNAVAILABLE: cli.Exit.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: cli.Exit.UNAVAILABLE,
}


def _token(ns: argparse.Namespace, settings: Settings) -> str | None:
    if ns.token_file is not None:
        return Path(ns.token_file).read_text(encoding="utf-8").strip()
    if settings.api_client_token is not None:
        return settings.api_client_token.get_secret_value()
    return None


def _channel(ns: argparse.Namespace, settings: Settings) -> grpc.aio.Channel:
    target = ns.target or settings.api_listen
    if ns.tls or ns.tls_ca or ns.tls_cert:
        options = (
            [("grpc.ssl_target_name_override", ns.tls_server_name)] if ns.tls_server_name else []
        )
        credentials = client_credentials(ns.tls_ca, ns.tls_cert, ns.tls_key)
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target)


def _request(ns: argparse.Namespace) -> Message:
    """The request of the client subcommand in ns (get, send or disconnect)."""
    if ns.command == "get":
        return connection_service_pb2.GetConnectionRequest(connection_id=ns.connection_id)
    if ns.command == "disconnect":
        return connection_service_pb2.DisconnectRequest(connection_id=ns.connection_id)
    request = connection_service_pb2.SendToConnectionRequest
    if ns.text is not None:
        return request(
            connection_id=ns.connection_id,
            data=ns.text.encode("utf-8", "surrogateescape"),
            type=request.TEXT,
        )
    try:
        data = base64.b64decode(ns.binary, validate=True)
    except (binascii.Error, ValueError):
        raise cli.CommandError(
            f"--binary = {ns.binary!r}: not base64 (the frame's bytes are given in base64)",
            cli.Exit.USAGE,
        ) from None
    return request(connection_id=ns.connection_id, data=data, type=request.BINARY)


async def call(ns: argparse.Namespace, settings: Settings) -> int:
    """get / send / disconnect: one call, the answer as JSON on stdout (`{}` for send and
    disconnect, once the gateway node has written the frame / closed the socket)."""
    request = _request(ns)
    token = _token(ns, settings)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with _channel(ns, settings) as channel:
        stub = connection_service_pb2_grpc.ConnectionServiceStub(channel)
        method = {"get": stub.Get, "send": stub.Send, "disconnect": stub.Disconnect}[ns.command]
        pending = method(request, timeout=ns.timeout, metadata=metadata)
        try:
            answer = await pending
        except grpc.aio.AioRpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return _CALL_EXIT.get(exc.code(), cli.Exit.NEGATIVE)
        trailing = await pending.trailing_metadata()
    print(MessageToJson(answer, indent=2, always_print_fields_with_no_presence=True))
    if ns.verbose:
        for key, value in trailing or ():
            if key.startswith("x-projection"):
                print(f"{key}: {value!s}", file=sys.stderr)
    return cli.Exit.OK


def add_client_flags(p: argparse.ArgumentParser, timeout: float) -> None:
    p.add_argument("connection_id")
    p.add_argument("--target", help="server address (default: CONNTRACK_API_LISTEN)")
    p.add_argument(
        "--timeout", type=float, default=timeout, help=f"deadline in seconds (default {timeout:g})"
    )
    p.add_argument("--tls", action="store_true", help="use TLS with the system's CA roots")
    p.add_argument("--tls-ca", type=Path, help="CA file to trust (implies --tls)")
    p.add_argument("--tls-cert", type=Path, help="client certificate for mutual TLS")
    p.add_argument("--tls-key", type=Path, help="client key for mutual TLS")
    p.add_argument("--tls-server-name", help="expected server name, if not the target's host")
    p.add_argument(
        "--token-file",
        type=Path,
        help="file holding the bearer token (default: CONNTRACK_API_CLIENT_TOKEN)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print freshness headers to stderr")
    cli.add_settings(p, ("api", "logging"))
