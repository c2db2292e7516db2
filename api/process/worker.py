"""One worker process of `conntrack-api serve` (api/process/workers.py is its supervisor): a whole
API server on the shared port, stopped by SIGTERM from the supervisor or by the supervisor's
end of the pipe closing (it died); a start it cannot make is reported to the supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from conntrack.core import cli
from conntrack.core.process import PYTHON_GEN0_THRESHOLD, setup_logging, tune_gc
from conntrack.core.settings import Settings

if TYPE_CHECKING:
    from conntrack.api.transport.server import ApiServer

log = logging.getLogger(__name__)


@dataclass
class _WorkerState:
    ready: bool = False
    stop_requested: bool = False  # SIGTERM before the server was up
    stopping: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def worker_main(settings: Settings, index: int, conn: Connection) -> None:
    """A worker process: one API server (api/process/serve.py) on the shared port, stopped by
    SIGTERM from the supervisor or by the supervisor's end of `conn` closing (it died)."""
    # The supervisor forwards a terminal's Ctrl-C as SIGTERM; a SIGINT of our own on top would
    # count as the second signal and cut the drain short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    state = _WorkerState()

    def early_stop(signum: int, frame: object) -> None:
        state.stop_requested = True

    # A worker still starting when the supervisor stops: it stops once up, as the others do.
    signal.signal(signal.SIGTERM, early_stop)
    setup_logging(settings.log_level, settings.log_format, worker=index)
    # Imported here, after the SIGTERM handler above: the server's modules take a while to
    # load, and a worker stopped meanwhile must still stop cleanly (and before tune_gc's
    # freeze, so they are frozen with the rest).
    from conntrack.api.process.serve import serve

    tune_gc(settings.gc_gen0_threshold, default=PYTHON_GEN0_THRESHOLD)
    try:
        code = asyncio.run(_work(serve, settings, conn, state))
    except cli.CommandError as exc:
        code = exc.code
        _report_start_error(conn, state, str(exc), exc.code)
    except Exception as exc:
        message = cli.dependency_error(exc, settings)
        if message is None or state.ready:
            raise  # a bug, or trouble after the start: the traceback, and a replacement
        code = cli.Exit.UNAVAILABLE
        _report_start_error(conn, state, message, code)
    conn.close()
    sys.exit(int(code))


def _report_start_error(conn: Connection, state: _WorkerState, message: str, code: int) -> None:
    if state.ready:
        log.error("%s", message)  # after the start: the supervisor replaces this worker
        return
    with contextlib.suppress(OSError):
        conn.send(("error", message, int(code)))


async def _work(
    serve: Callable[..., Awaitable[int]], settings: Settings, conn: Connection, state: _WorkerState
) -> int:
    loop = asyncio.get_running_loop()

    def started(server: ApiServer) -> None:
        def stop(reason: str) -> None:
            if state.stopping:
                return
            state.stopping = True
            log.info("%s, shutting down", reason)
            loop.remove_reader(conn.fileno())
            task = loop.create_task(server.stop())
            state.tasks.add(task)
            task.add_done_callback(state.tasks.discard)

        loop.add_signal_handler(signal.SIGTERM, stop, "received SIGTERM")
        # The supervisor never writes after the start: readable means its end closed.
        loop.add_reader(conn.fileno(), stop, "the supervisor is gone")
        conn.send(("ready",))
        state.ready = True
        if state.stop_requested:
            stop("received SIGTERM")

    return await serve(settings, started=started)
