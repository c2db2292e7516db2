"""The Get ceiling: a grpc.aio server on the same stack as the API (grpcio, asyncio, the same
generated messages, health checking) that answers every Get with one fixed Connection, without
touching a database. `python -m bench.constant_server --listen 127.0.0.1:50099`.

--workers N runs N such processes on the one port (grpc's own SO_REUSEPORT, on by default on
Linux), the ceiling `conntrack-api serve` with N workers is compared with; this parent only
starts them, forwards SIGTERM/SIGINT and waits."""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from conntrack.core.process import (
    PYTHON_GEN0_THRESHOLD,
    on_shutdown_signal,
    setup_logging,
    tune_gc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_pb2,
    connection_service_pb2,
)
from conntrack.core.settings import settings_from
from conntrack.core.timeutil import to_timestamp

SERVICE = "yandex.cloud.serverless.apigateway.websocket.v1.ConnectionService"
_NOW_NS = 1_767_225_600_000_000_000

ANSWER = connection_pb2.Connection(
    id="0123456789abcdef01234567",
    gateway_id="d5d0123456789abcdef",
    identity=connection_pb2.Identity(
        source_ip="203.0.113.7",
        user_agent="Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    ),
    connected_at=to_timestamp(_NOW_NS),
    last_active_at=to_timestamp(_NOW_NS + 1_000_000_000),
)


async def get(
    request: connection_service_pb2.GetConnectionRequest,
    context: grpc.aio.ServicerContext[object, object],
) -> connection_pb2.Connection:
    return ANSWER


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    handlers = {
        "Get": grpc.unary_unary_rpc_method_handler(
            get,
            request_deserializer=connection_service_pb2.GetConnectionRequest.FromString,
            response_serializer=connection_pb2.Connection.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    # grpcio-health-checking ships the asyncio servicer without type information.
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop() -> None:
        await server.stop(1.0)

    on_shutdown_signal(stop)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.constant_server", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:50099")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    ns = parser.parse_args(argv)
    if ns.workers > 1:
        raise SystemExit(_run_workers(ns.listen, ns.log_level, ns.workers))
    setup_logging(ns.log_level)
    tune_gc(
        settings_from().gc_gen0_threshold, default=PYTHON_GEN0_THRESHOLD
    )  # as `conntrack-api serve` does
    asyncio.run(serve(ns.listen))


def _run_workers(listen: str, log_level: str, workers: int) -> int:
    argv = [sys.executable, "-m", "bench.constant_server", "--listen", listen]
    children = [
        subprocess.Popen([*argv, "--log-level", log_level], stdin=subprocess.DEVNULL)
        for _ in range(workers)
    ]

    def forward(signum: int, frame: object) -> None:
        for child in children:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


if __name__ == "__main__":
    main()
