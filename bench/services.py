"""The project's own commands run as subprocesses (conntrack-projector, conntrack-api serve,
the constant server), so their CPU and peak memory can be read per process, and they run
exactly as an operator would run them: configured through CONNTRACK_* variables."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.procstat import peak_rss_mb, rss_mb

REPO = Path(__file__).resolve().parent.parent
_BIN = Path(sys.executable).parent


def command(script: str, module: str) -> list[str]:
    """The installed console script if there is one (as an operator runs it), else -m."""
    path = _BIN / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment plus `extra`, which wins. CONNTRACK_* tuning settings in the
    caller's environment (e.g. CONNTRACK_BATCH_MAX_EVENTS) reach the subprocesses as they reach
    the in-process projector, so an experiment applies to the whole run; the JSON records them
    (meta.conntrack_environment)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Service:
    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self._argv = argv
        self._env = dict(env)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    async def start(self) -> None:
        with self.log_path.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv,
                env=self._env,
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )

    def check_alive(self) -> None:
        if self._proc is not None and self._proc.returncode is not None:
            raise RuntimeError(
                f"{self.name} exited with {self._proc.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def peak_rss_mb(self) -> float | None:
        return peak_rss_mb(self.pid)

    def rss_mb(self) -> float | None:
        return rss_mb(self.pid)

    async def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM (the commands stop gracefully on it), SIGKILL if that takes too long."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        return proc.returncode


@asynccontextmanager
async def running(service: Service) -> AsyncIterator[Service]:
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def wait_grpc_serving(target: str, service: Service, within_s: float = 30.0) -> None:
    """Until the server's health service answers SERVING (the API says so once its read model
    answers), or the process dies, or the timeout passes."""
    deadline = time.monotonic() + within_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            service.check_alive()
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{service.name} at {target} not SERVING after {within_s:.0f}s:\n"
                    f"{service.log_tail()}"
                )
            await asyncio.sleep(0.1)


# The load generators speak plaintext gRPC without credentials, so the API runs without TLS
# and tokens whatever the caller's environment says.
_API_SECURITY = (
    "CONNTRACK_API_TLS_CERT_FILE",
    "CONNTRACK_API_TLS_KEY_FILE",
    "CONNTRACK_API_TLS_CLIENT_CA_FILE",
    "CONNTRACK_API_TOKENS",
    "CONNTRACK_API_TOKENS_FILE",
)


def api_service(
    database_url: str, listen: str, log_dir: Path, extra: Mapping[str, str] | None = None
) -> Service:
    env = service_environment(
        {
            "CONNTRACK_DATABASE_URL": database_url,
            "CONNTRACK_API_LISTEN": listen,
            "CONNTRACK_LOG_LEVEL": "WARNING",
            "CONNTRACK_METRICS_PORT": "0",
            # One process, as the figures before workers were measured; get_workers asks more.
            "CONNTRACK_API_WORKERS": "1",
            **(extra or {}),
        }
    )
    for name in _API_SECURITY:
        env.pop(name, None)
    return Service(
        "conntrack-api", [*command("conntrack-api", "conntrack.api"), "serve"], env, log_dir
    )


def constant_service(listen: str, log_dir: Path) -> Service:
    argv = [sys.executable, "-m", "bench.constant_server", "--listen", listen]
    return Service("constant-server", argv, service_environment({}), log_dir)


def projector_service(settings_env: Mapping[str, str], log_dir: Path) -> Service:
    return Service(
        "conntrack-projector",
        command("conntrack-projector", "conntrack.projector"),
        service_environment({**settings_env, "CONNTRACK_METRICS_PORT": "0"}),
        log_dir,
    )
