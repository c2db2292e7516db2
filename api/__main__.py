"""conntrack-api: serve ConnectionService (`serve`), fetch one connection as JSON (`get`), write
a frame to one (`send`) or close it (`disconnect`) through the gateway node holding it."""

from __future__ import annotations

import os

from conntrack.api.process.client import add_client_flags, call
from conntrack.api.process.cores import available_cores, resolve_workers
from conntrack.api.process.serve import serve
from conntrack.api.process.workers import supervise
from conntrack.api.transport.auth import TokenConfigError
from conntrack.api.transport.server import security_of
from conntrack.api.transport.tls import TlsConfigError
from conntrack.core import cli
from conntrack.core.process import PYTHON_GEN0_THRESHOLD
from conntrack.core.tracing_setup import wanted as tracing_wanted


def main(argv: list[str] | None = None) -> None:
    prog = "conntrack-api"
    serving = ("kafka", "database", "api", "liveness", "history", "metrics", "logging")
    parser = cli.parser(prog, __doc__, serving)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the gRPC server until SIGTERM/SIGINT")
    cli.add_settings(s, serving)
    g = sub.add_parser("get", help="call Get on a running server and print the answer as JSON")
    add_client_flags(g, timeout=5.0)
    w = sub.add_parser(
        "send",
        help="call Send: the gateway node holding the connection writes one frame to it",
    )
    data = w.add_mutually_exclusive_group(required=True)
    data.add_argument("--text", metavar="TEXT", help="send a TEXT frame with this text")
    data.add_argument("--binary", metavar="BASE64", help="send a BINARY frame of these bytes")
    add_client_flags(w, timeout=15.0)
    d = sub.add_parser(
        "disconnect",
        help="call Disconnect: the gateway node holding the connection closes it (code 1000)",
    )
    add_client_flags(d, timeout=15.0)
    ns = parser.parse_args(argv)
    settings = cli.start(prog, ns, gen0_threshold=PYTHON_GEN0_THRESHOLD)
    if ns.command == "serve":
        try:
            workers = resolve_workers(settings.api_workers, settings.api_listen, available_cores())
            security_of(settings)  # every file named, before any worker is forked
            tracing_wanted(os.environ)  # an exporter that cannot work, likewise
        except cli.CommandError as exc:
            cli.fail(prog, exc)
        except (TlsConfigError, TokenConfigError) as exc:
            cli.fail(prog, cli.CommandError(f"cannot start: {exc}", cli.Exit.USAGE))
        if workers == 1:
            cli.run(prog, lambda: serve(settings), settings)
        cli.run(prog, lambda: supervise(settings, workers), settings)

    async def client() -> int:
        try:
            return await call(ns, settings)
        except (TlsConfigError, OSError) as exc:
            raise cli.CommandError(str(exc), cli.Exit.USAGE) from None

    cli.run(prog, client, settings)


if __name__ == "__main__":
    main()
