"""`conntrack-api serve` on every core: a supervisor process and N worker processes, each a
whole API server (api/process/serve.py) listening on the same port.

How the port is shared: the kernel spreads incoming connections over the workers' listening
sockets (SO_REUSEPORT, grpc's `grpc.so_reuseport`). Before any worker starts, the supervisor
binds the address itself without SO_REUSEPORT, so that a port held by anyone else (another API,
a default grpc server, any listener) is refused at once with the same one-line error as a single
process gives; only then does it switch SO_REUSEPORT on for that socket and keep it, bound and
not listening (it takes no connections), for as long as it runs. Holding it resolves port 0 once
for all workers and keeps the port ours while a worker is replaced. Linux only lets processes of
the same user join a SO_REUSEPORT group: another user's server can never share it; a process of
the same user that binds with SO_REUSEPORT after the supervisor started could (as with any
SO_REUSEPORT server).

The supervisor starts the workers (multiprocessing's spawn: fresh interpreters, so the
Settings object is handed over as it is), replaces a worker that dies, after a pause that
doubles while replacements keep dying young (RestartBackoff), forwards SIGTERM/SIGINT to every
worker and waits for them to drain (api_grace_seconds, then SIGKILL), and exits 0 once they
all have. A worker that cannot start for a reason a restart would not change (a TLS file, the
token file, its address: what a lone process reports as `cannot start: ...`) tells the
supervisor, which stops the others and exits with that one line and its exit code.

Metrics: prometheus_client's multiprocess mode (api/transport/metrics.py). Each serve gets a fresh
PROMETHEUS_MULTIPROC_DIR, the workers write their metrics there, and the supervisor serves their
sum on the one metrics port (the same families a lone process has, without the per-process
process_* and python_gc_*), so a scrape sees the whole server and dashboards need no change; a
dead worker's gauges are dropped (mark_process_dead), its counters stay in the sums. Per-worker
ports were the other choice: N targets to scrape and to add up in every query, and a port per
worker to configure.

Each worker logs `[worker N pid P]` (fields worker and pid in JSON logs); the supervisor's own
lines name the worker and its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from prometheus_client.multiprocess import mark_process_dead

from conntrack.api.process.worker import worker_main
from conntrack.api.transport.metrics import aggregated_registry
from conntrack.core import cli
from conntrack.core.settings import Settings

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# How much longer than the grace period the supervisor waits for a draining worker: the time it
# takes to close the command channel and the database pool after the last call.
STOP_MARGIN_SECONDS = 10.0


@dataclass
class RestartBackoff:
    """The pause before a dead worker is replaced: `initial`, doubled for each replacement that
    died within `stable_seconds` of its start (a worker crashing at start does not spin),
    at most `ceiling`; back to `initial` once a worker had lived that long."""

    initial: float = 0.5
    ceiling: float = 30.0
    stable_seconds: float = 30.0
    _next: float = field(default=-1.0, repr=False)

    def delay(self, lived_seconds: float) -> float:
        if self._next < 0 or lived_seconds >= self.stable_seconds:
            self._next = self.initial
        pause = self._next
        self._next = min(self.ceiling, pause * 2)
        return pause


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise OSError(f"cannot listen on {listen} (not host:port)")
    return host, int(port_text)


def hold_port(listen: str) -> tuple[list[socket.socket], str]:
    """Bind listen's address(es) as described in the module's docstring; returns the sockets
    (closed by the caller at exit) and the address the workers listen on (port 0 resolved).
    Raises OSError `cannot listen on ...` if anyone holds the port."""
    host, port = _split_listen(listen)
    bare = host.removeprefix("[").removesuffix("]")
    if bare in ("", "0.0.0.0", "::"):
        # grpc binds a wildcard address as dual-stack [::] where it can, as 0.0.0.0 otherwise.
        families: list[tuple[socket.AddressFamily, tuple[Any, ...]]] = []
        if socket.has_ipv6:
            families.append((socket.AF_INET6, ("::", port, 0, 0)))
        families.append((socket.AF_INET, ("0.0.0.0", port)))
        wildcard = True
    else:
        try:
            infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise OSError(f"cannot listen on {listen} ({exc.strerror or exc})") from None
        families = list(dict.fromkeys((info[0], info[4]) for info in infos))
        wildcard = False
    held: list[socket.socket] = []
    try:
        for family, address in families:
            if held:
                address = (address[0], port, *address[2:])
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                # As grpc does: a port whose last connections are in TIME_WAIT can be bound.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and wildcard:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(address)
            except OSError as exc:
                sock.close()
                no_ipv6 = family == socket.AF_INET6 and exc.errno != errno.EADDRINUSE
                if wildcard and no_ipv6:
                    continue
                raise OSError(f"cannot listen on {listen} (address in use?)") from None
            # Bound without SO_REUSEPORT, so a holder was refused; from now on the workers may
            # join (the kernel judges a later bind by this socket's flag as it is then).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            held.append(sock)
            port = sock.getsockname()[1]
            if wildcard:
                break  # dual-stack [::] covers IPv4 too
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held, f"{host}:{port}"


@dataclass
class _Slot:
    index: int
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    process: BaseProcess | None = None
    pid: int = 0
    conn: Connection | None = None
    started_at: float = 0.0
    ready: bool = False
    error: tuple[str, int] | None = None
    restart: asyncio.TimerHandle | None = None


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exited"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


class Supervisor:
    """Runs `workers` worker processes until a signal or a worker's start error (run())."""

    def __init__(self, settings: Settings, workers: int, multiproc_dir: str) -> None:
        """settings: the workers' (api_listen with its port resolved, no metrics port)."""
        self._settings = settings
        self._multiproc_dir = multiproc_dir
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(index) for index in range(1, workers + 1)]
        self._events: asyncio.Queue[tuple[str, _Slot]] = asyncio.Queue()
        self._stopping = False
        self._interrupted = False
        self._fatal: tuple[str, int] | None = None
        self._unclean: list[str] = []
        self._kill_timer: asyncio.TimerHandle | None = None
        self._announced = False

    def _alive(self) -> list[_Slot]:
        return [slot for slot in self._slots if slot.process is not None]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            for slot in self._slots:
                self._start(slot)
            while self._alive() or not self._stopping:
                kind, slot = await self._events.get()
                if kind == "exit":
                    self._exited(slot)
                elif kind == "ready":
                    self._ready(slot)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            for slot in self._alive():  # only when run() itself failed
                self._kill(slot)
        if self._fatal is not None:
            raise cli.CommandError(self._fatal[0], cli.Exit(self._fatal[1]))
        if self._interrupted:
            raise cli.CommandError("interrupted: the workers were killed", cli.Exit.INTERRUPTED)
        if self._unclean:
            log.warning("not every worker drained: %s", "; ".join(self._unclean))
            return cli.Exit.NEGATIVE
        log.info("all %d workers stopped", len(self._slots))
        return cli.Exit.OK

    def _start(self, slot: _Slot) -> None:
        slot.restart = None
        if self._stopping:
            return
        loop = asyncio.get_running_loop()
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=worker_main,
            args=(self._settings, slot.index, child_end),
            name=f"conntrack-api-worker-{slot.index}",
        )
        process.start()
        child_end.close()  # the worker's end lives in the worker: its EOF tells us nothing
        slot.process, slot.conn, slot.pid = process, parent_end, process.pid or 0
        slot.started_at, slot.ready, slot.error = time.monotonic(), False, None
        loop.add_reader(parent_end.fileno(), self._on_message, slot)
        loop.add_reader(process.sentinel, self._on_exit, slot)
        log.info("worker %d started (pid %d)", slot.index, slot.pid)

    def _on_message(self, slot: _Slot) -> None:
        conn = slot.conn
        assert conn is not None
        try:
            message = conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            return
        self._handle(slot, message)

    def _handle(self, slot: _Slot, message: tuple[Any, ...]) -> None:
        if message[0] == "ready":
            slot.ready = True
            self._events.put_nowait(("ready", slot))
        elif message[0] == "error":
            slot.error = (str(message[1]), int(message[2]))

    def _on_exit(self, slot: _Slot) -> None:
        assert slot.process is not None
        asyncio.get_running_loop().remove_reader(slot.process.sentinel)
        self._events.put_nowait(("exit", slot))

    def _ready(self, slot: _Slot) -> None:
        if self._stopping:
            return
        log.info("worker %d (pid %d) serving", slot.index, slot.pid)
        if not self._announced and all(s.ready for s in self._slots):
            self._announced = True
            log.info(
                "serving on %s with %d workers (supervisor pid %d)",
                self._settings.api_listen,
                len(self._slots),
                os.getpid(),
            )

    def _exited(self, slot: _Slot) -> None:
        process, conn = slot.process, slot.conn
        assert process is not None
        assert conn is not None
        loop = asyncio.get_running_loop()
        # An error the worker sent just before exiting may still be in the pipe.
        with contextlib.suppress(EOFError, OSError):
            while conn.poll():
                self._handle(slot, conn.recv())
        loop.remove_reader(conn.fileno())
        conn.close()
        process.join()
        exitcode = process.exitcode
        slot.process, slot.conn = None, None
        mark_process_dead(slot.pid, self._multiproc_dir)  # type: ignore[no-untyped-call]
        how = _describe_exit(exitcode)
        if slot.error is not None:
            log.info("worker %d (pid %d) could not start: %s", slot.index, slot.pid, slot.error[0])
            if self._fatal is None:
                self._fatal = slot.error
            self._begin_stop()
        elif self._stopping:
            log.info("worker %d (pid %d) %s", slot.index, slot.pid, how)
            if exitcode != 0:
                self._unclean.append(f"worker {slot.index} (pid {slot.pid}) {how}")
        else:
            pause = slot.backoff.delay(time.monotonic() - slot.started_at)
            log.warning(
                "worker %d (pid %d) %s; a new worker %d starts in %.1fs",
                slot.index,
                slot.pid,
                how,
                slot.index,
                pause,
            )
            slot.restart = loop.call_later(pause, self._start, slot)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping and self._fatal is None:
            log.warning("received %s again: killing the workers", sig.name)
            self._interrupted = True
            for slot in self._alive():
                self._kill(slot)
            return
        log.info("received %s, stopping %d workers", sig.name, len(self._alive()))
        self._begin_stop()

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        for slot in self._slots:
            if slot.restart is not None:
                slot.restart.cancel()
                slot.restart = None
            if slot.process is not None and slot.process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)
        grace = self._settings.api_grace_seconds + STOP_MARGIN_SECONDS
        self._kill_timer = asyncio.get_running_loop().call_later(grace, self._kill_stragglers)
        # A stop with no worker alive (all between restarts) ends run() at once.
        self._events.put_nowait(("stopping", self._slots[0]))

    def _kill_stragglers(self) -> None:
        for slot in self._alive():
            log.warning("worker %d (pid %d) still running: killed", slot.index, slot.pid)
            self._kill(slot)

    @staticmethod
    def _kill(slot: _Slot) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.pid, signal.SIGKILL)


async def supervise(settings: Settings, workers: int) -> int:
    """`serve` with `workers` worker processes (see the module's docstring)."""
    from conntrack.api.transport.server import (
        listen_host,  # api.server is heavy; the supervisor needs one helper
    )

    held: list[socket.socket] = []
    try:
        held, listen = hold_port(settings.api_listen)
        if settings.api_rest_port:
            # The REST mapping's port (api/transport/rest.py) is shared by the workers the same way.
            rest_host = listen_host(settings.api_listen)
            rest_host = f"[{rest_host}]" if ":" in rest_host else rest_host
            held += hold_port(f"{rest_host}:{settings.api_rest_port}")[0]
    except OSError as exc:
        for sock in held:
            sock.close()
        raise cli.CommandError(f"cannot start: {exc}", cli.Exit.USAGE) from None
    multiproc_dir = tempfile.mkdtemp(prefix="conntrack-api-metrics-")
    # Read by prometheus_client when a worker imports it: the workers inherit the environment.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    http: tuple[Any, threading.Thread] | None = None
    try:
        if settings.metrics_port:
            host = settings.api_metrics_host
            host = listen_host(settings.api_listen) if host is None else host
            try:
                http = start_http_server(
                    settings.metrics_port, addr=host, registry=aggregated_registry(multiproc_dir)
                )
            except OSError as exc:
                raise cli.CommandError(f"cannot start: {exc}", cli.Exit.USAGE) from None
            log.info("metrics of all %d workers on %s:%d", workers, host, settings.metrics_port)
        worker_settings = settings.model_copy(update={"api_listen": listen, "metrics_port": 0})
        return await Supervisor(worker_settings, workers, multiproc_dir).run()
    finally:
        if http is not None:
            server, thread = http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        for sock in held:
            sock.close()
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(multiproc_dir, ignore_errors=True)
