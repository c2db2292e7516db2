"""Starting tracing in a service process, configured the usual OpenTelemetry way.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
set, unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The SDK then exports spans
over OTLP/gRPC, and reads its other variables itself (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_HEADERS`,
`OTEL_EXPORTER_OTLP_CERTIFICATE`, `OTEL_EXPORTER_OTLP_INSECURE`, ...). The gRPC server, the REST
server and SQLAlchemy are traced by their maintained instrumentations, installed before the
servers and engines are made; Kafka by core/tracing.py. Off, nothing here is imported beyond this
module, and nothing is installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Coroutine, Iterator, Mapping
from typing import Any, Final

from conntrack.core.cli import CommandError, Exit
from conntrack.core.process_metrics import package_version

log = logging.getLogger(__name__)

_ENDPOINTS: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROTOCOLS: Final = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
# How long a stopping process waits for its last spans to be exported.
_FLUSH_MS: Final = 2000


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces; a protocol this build cannot export is a usage
    error (one line, exit 2), found before a server starts or forks its workers."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    if not any(env.get(name) for name in _ENDPOINTS):
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter != "otlp":
        raise CommandError(
            f"OTEL_TRACES_EXPORTER={exporter}: only otlp (or none) is supported", Exit.USAGE
        )
    for name in _PROTOCOLS:
        protocol = env.get(name, "").strip()
        if protocol and protocol != "grpc":
            raise CommandError(
                f"{name}={protocol}: traces are exported over OTLP/gRPC only; set it to grpc "
                "(a collector listens for it on port 4317)",
                Exit.USAGE,
            )
    return True


@contextlib.contextmanager
def traced(
    service: str,
    *,
    servers: bool = False,
    database: bool = False,
    env: Mapping[str, str] | None = None,
) -> Iterator[bool]:
    """Trace this process while in the block if the environment asks for it (yields whether it
    does), with the instrumentations of the gRPC and REST servers (`servers`) and of SQLAlchemy
    (`database`); on leaving, export what is left, waiting at most _FLUSH_MS."""
    env = os.environ if env is None else env
    if not wanted(env):
        yield False
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer
    from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (read by Resource.create) name the service
    # if they say; otherwise it is the command's name.
    resource = Resource.create({SERVICE_VERSION: package_version()})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    # shutdown_on_exit=False: the SDK's own exit hook would wait for an unreachable collector
    # for its whole timeout; the flush below is bounded.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    instrumentors: list[BaseInstrumentor] = []
    if servers:
        instrumentors += [GrpcAioInstrumentorServer(), AioHttpServerInstrumentor()]  # type: ignore[no-untyped-call]
    if database:
        instrumentors.append(SQLAlchemyInstrumentor())
    for instrumentor in instrumentors:
        # Its declared range of SQLAlchemy ends before 2.1, whose engine events it uses are
        # unchanged (the tracing test sees its spans).
        instrumentor.instrument(tracer_provider=provider, skip_dep_check=True)
    log.info(
        "event=tracing_on service=%s endpoint=%s",
        resource.attributes.get(SERVICE_NAME),
        next(env[name] for name in _ENDPOINTS if env.get(name)),
    )
    try:
        yield True
    finally:
        if not provider.force_flush(_FLUSH_MS):
            log.warning("event=traces_not_flushed: the collector did not take the last spans")
        for instrumentor in instrumentors:
            instrumentor.uninstrument()


async def run_traced(
    service: str, body: Coroutine[Any, Any, int], *, database: bool = False
) -> int:
    """A command's body, traced if the environment asks for it."""
    try:
        with traced(service, database=database):
            return await body
    finally:
        body.close()  # not awaited if tracing could not start; a no-op once it has run
