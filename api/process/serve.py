"""One API server process: the read model's repository, the gRPC server (and its REST mapping),
until SIGTERM/SIGINT or, in a worker, until the supervisor stops it."""

from __future__ import annotations

from collections.abc import Callable

from conntrack.api.read.repository import open_repository
from conntrack.api.transport.auth import TokenConfigError
from conntrack.api.transport.server import ApiServer
from conntrack.api.transport.tls import TlsConfigError
from conntrack.core import cli
from conntrack.core.process import on_shutdown_signal
from conntrack.core.settings import Settings
from conntrack.core.tracing_setup import traced


async def serve(settings: Settings, *, started: Callable[[ApiServer], None] | None = None) -> int:
    """One server process until SIGTERM/SIGINT. started: a worker process's
    (api/process/workers.py), called once the server listens, instead of the signal handling of a
    lone process."""
    # Traced (if asked) from before the server and the engines exist: their instrumentations
    # are installed by then.
    with traced("conntrack-api", servers=True, database=True):
        # database_url, or the read replicas when CONNTRACK_API_READ_DATABASE_URLS lists some.
        async with open_repository(settings) as repository:
            try:
                server = ApiServer.from_settings(repository, settings, worker=started is not None)
                await server.start()
            except (TlsConfigError, TokenConfigError, OSError) as exc:
                raise cli.CommandError(f"cannot start: {exc}", cli.Exit.USAGE) from None
            if started is None:
                on_shutdown_signal(server.stop)
            else:
                started(server)
            await server.wait()
            return cli.Exit.OK
