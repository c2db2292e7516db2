"""The gRPC server's lifecycle: ConnectionService and the directory behind the wrappers
(api/transport/wrappers.py: metrics, tokens, the cap on calls in flight), health checking
that follows the read model's readiness, server reflection (grpcurl works without .proto
files), optional TLS, a Prometheus endpoint, the REST mapping (api/transport/rest.py), and a
graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from conntrack.api.application.broadcast import Broadcaster, BroadcastRpc
from conntrack.api.application.commands import CommandChannel
from conntrack.api.application.directory import (
    DIRECTORY_SERVICE,
    DIRECTORY_SERVICE_NAME,
    ConnectionDirectory,
    ConnectionDirectoryService,
)
from conntrack.api.application.history import ConnectionHistory, HistoryRpc
from conntrack.api.application.service import SERVICE, SERVICE_NAME, ConnectionService
from conntrack.api.application.targets import MAX_ANSWER_BYTES, TargetedActions, TargetedRpc
from conntrack.api.read.repository import ConnectionRepository, ReadModelUnavailable
from conntrack.api.transport import openapi, reflection, rest
from conntrack.api.transport.auth import BearerTokens, load_tokens
from conntrack.api.transport.grpc_handlers import handlers
from conntrack.api.transport.metrics import ApiMetrics
from conntrack.api.transport.tls import ServerTls
from conntrack.api.transport.wrappers import CallLimit, Wrap, authenticated, composed, metered
from conntrack.core.kafka import KafkaConnection
from conntrack.core.liveness import Liveness
from conntrack.core.settings import Settings, default

log = logging.getLogger(__name__)
# After the grace: how long the queries of the calls that were cut may take to end.
_RELEASE_S = 0.5


async def _done() -> None:
    pass


def listen_host(listen: str) -> str:
    """The host part of a gRPC listen address ('127.0.0.1:50051', '[::]:50051',
    '0.0.0.0:50051'), for binding the metrics endpoint alongside; '' (all interfaces) for
    an address without one (':50051'), loopback for a Unix socket ('unix:/path')."""
    if listen.startswith("unix:"):
        return "127.0.0.1"
    host, _, _ = listen.rpartition(":")
    return host.removeprefix("[").removesuffix("]")


class ApiServer:
    """Async context manager around grpc.aio.Server; start() and stop() are idempotent."""

    def __init__(
        self,
        repository: ConnectionRepository,
        listen: str,
        *,
        grace_seconds: float = default("api_grace_seconds"),
        health_interval_seconds: float = default("api_health_interval_seconds"),
        tls: ServerTls | None = None,
        tokens: BearerTokens | None = None,
        max_message_bytes: int = default("api_max_message_bytes"),
        max_concurrent_calls: int = default("api_max_concurrent_calls"),
        db_timeout_seconds: float = default("api_db_timeout_seconds"),
        freshness_ttl_seconds: float = default("api_freshness_ttl_ms") / 1000,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
        rest_port: int | None = None,
        liveness: Liveness | None = None,
        commands: CommandChannel | None = None,
        command_timeout_seconds: float = default("api_command_timeout_seconds"),
        max_connection_age_seconds: float = default("api_max_connection_age_seconds"),
        max_connection_age_grace_seconds: float = default("api_max_connection_age_grace_seconds"),
        keepalive_seconds: float = default("api_keepalive_seconds"),
        history_days: int = default("history_days"),
        worker: bool = False,
    ) -> None:
        """metrics_port None serves no /metrics endpoint; 0 picks a free port. metrics_host
        None binds it to the host of `listen`. worker: one of several server processes of
        `conntrack-api serve` (api/process/workers.py): the listen port is shared with the others
        (SO_REUSEPORT, see reuse_port) and the metrics go to prometheus_client's multiprocess
        files, which the supervisor serves (give no metrics_port)."""
        self._repository = repository
        self._listen = listen
        self._connection_options = _connection_options(
            max_connection_age_seconds, max_connection_age_grace_seconds, keepalive_seconds
        )
        self._grace = grace_seconds
        self._health_interval = health_interval_seconds
        self._tls = tls
        self._tokens = tokens
        self._max_message_bytes = max_message_bytes
        self._db_timeout = db_timeout_seconds
        self._metrics_port = metrics_port
        self._metrics_host = listen_host(listen) if metrics_host is None else metrics_host
        self._rest_port = rest_port
        self._rest: rest.RestSite | None = None
        # Whether listening sockets share their port with the other workers (SO_REUSEPORT).
        self.reuse_port = worker
        self.metrics = ApiMetrics(multiprocess=worker)
        self.metrics.track_reads(repository.read_stats)
        self._service = ConnectionService(
            repository,
            db_timeout_seconds=db_timeout_seconds,
            freshness_ttl_seconds=freshness_ttl_seconds,
            liveness=liveness,
            commands=commands,
            command_timeout_seconds=command_timeout_seconds,
        )
        # The connection directory (api/application/directory.py), beside ConnectionService; public
        # so an HTTP front end can call the same transport-neutral code.
        self.directory = ConnectionDirectory(
            repository,
            liveness=liveness,
            db_timeout_seconds=db_timeout_seconds,
            freshness_ttl_seconds=freshness_ttl_seconds,
        )
        targeted = TargetedRpc(TargetedActions(self.directory, commands), command_timeout_seconds)
        # Answers in time (api/application/history.py); public like the directory.
        self.history = ConnectionHistory(
            repository.history(), self.directory, self.directory.liveness, history_days
        )
        self._directory_service = ConnectionDirectoryService(
            self.directory,
            BroadcastRpc(Broadcaster(self.directory, commands), command_timeout_seconds),
            targeted.send,
            targeted.disconnect,
            HistoryRpc(self.history),
        )
        self._commands = commands
        self._limit = CallLimit(max_concurrent_calls, self.metrics.in_flight.set)
        # Every call of the two services, gRPC's and REST's alike, outermost first.
        self._wrap: Wrap = composed(
            metered(self.metrics),
            *([authenticated(tokens)] if tokens is not None else []),
            self._limit.wrap,
        )
        self._server: grpc.aio.Server | None = None
        # grpc-stubs do not know the asyncio servicer.
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._health_task: asyncio.Task[None] | None = None
        self._metrics_sync_task: asyncio.Task[None] | None = None
        self._serving: bool | None = None
        self._stopped = asyncio.Event()
        self.port: int | None = None
        self.metrics_http_host: str | None = None  # where /metrics listens, once started
        self.metrics_http_port: int | None = None
        self.rest_port: int | None = None  # the REST mapping's port, once started

    @classmethod
    def from_settings(
        cls, repository: ConnectionRepository, settings: Settings, *, worker: bool = False
    ) -> ApiServer:
        """A server configured by CONNTRACK_API_* (docs/api.md); raises TlsConfigError or
        TokenConfigError for unusable certificate or token configuration."""
        tls, tokens = security_of(settings)
        return cls(
            repository,
            settings.api_listen,
            grace_seconds=settings.api_grace_seconds,
            health_interval_seconds=settings.api_health_interval_seconds,
            tls=tls,
            tokens=tokens,
            max_message_bytes=settings.api_max_message_bytes,
            max_concurrent_calls=settings.api_max_concurrent_calls,
            db_timeout_seconds=settings.api_db_timeout_seconds,
            freshness_ttl_seconds=settings.api_freshness_ttl_ms / 1000,
            metrics_port=settings.metrics_port or None,
            metrics_host=settings.api_metrics_host,
            rest_port=settings.api_rest_port or None,
            history_days=settings.history_days,
            liveness=Liveness.of_seconds(
                settings.node_lease_seconds,
                settings.connection_idle_timeout_seconds,
                settings.connection_max_lifetime_seconds,
            ),
            commands=CommandChannel(
                KafkaConnection.from_settings(settings, "api"),
                settings.commands_topic,
                settings.command_outcomes_topic,
                linger_ms=settings.commands_linger_ms,
                fetch_wait_ms=settings.commands_fetch_wait_ms,
            ),
            command_timeout_seconds=settings.api_command_timeout_seconds,
            max_connection_age_seconds=settings.api_max_connection_age_seconds,
            max_connection_age_grace_seconds=settings.api_max_connection_age_grace_seconds,
            keepalive_seconds=settings.api_keepalive_seconds,
            worker=worker,
        )

    @property
    def rest_app(self) -> web.Application | None:
        """The REST mapping's application while it is served (its routes, for the OpenAPI
        document's test)."""
        return self._rest.app if self._rest else None

    @property
    def in_flight(self) -> int:
        """ConnectionService calls being served now."""
        return self._limit.in_flight

    async def _start_rest(self, port: int) -> rest.RestSite:
        site = rest.RestSite(
            rest.build_app(
                {SERVICE_NAME: self._service, DIRECTORY_SERVICE_NAME: self._directory_service},
                self._wrap,
                max_body_bytes=self._max_message_bytes,
                openapi=openapi.document(secured=self._tokens is not None),
            ),
            listen_host(self._listen),
            port,
            ssl_context=self._tls.ssl_context() if self._tls else None,
            reuse_port=self.reuse_port,
            grace_seconds=self._grace,
        )
        await site.start()
        return site

    async def start(self) -> None:
        if self._server is not None:
            return
        credentials = self._tls.credentials() if self._tls else None
        server = grpc.aio.server(
            options=[
                # gRPC on Linux would otherwise share a port with another server silently;
                # a second API on the same address must fail loudly instead. Workers share
                # it on purpose: their supervisor has refused a port held by anyone else.
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
                ("grpc.max_receive_message_length", self._max_message_bytes),
                # Answers may be larger than any request: an outcome for each of up to
                # MAX_TARGETS targets (api/application/targets.py) fits gRPC clients' default
                # receive limit of 4 MiB, which this matches.
                ("grpc.max_send_message_length", max(self._max_message_bytes, MAX_ANSWER_BYTES)),
                *self._connection_options,
            ],
        )
        if self._commands is not None:
            await self._commands.start()  # connects in the background: Get never waits for it
        for service, servicer in (
            (SERVICE, self._service),
            (DIRECTORY_SERVICE, self._directory_service),
        ):
            by_name = handlers(servicer, service, self._wrap)
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service.full_name, by_name),)
            )
            server.add_registered_method_handlers(service.full_name, by_name)  # type: ignore[attr-defined]
            self.metrics.initialize(f"/{service.full_name}/{method}" for method in by_name)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, DIRECTORY_SERVICE_NAME, health.SERVICE_NAME), server
        )
        try:
            if credentials is None:
                self.port = server.add_insecure_port(self._listen)
            else:
                self.port = server.add_secure_port(self._listen, credentials)
        except RuntimeError as exc:  # grpc's way of saying the bind failed
            raise OSError(f"cannot listen on {self._listen} (address in use?)") from exc
        if self._rest_port is not None:
            self._rest = await self._start_rest(self._rest_port)
            self.rest_port = self._rest.port
            log.info("REST mapping on %s:%d", listen_host(self._listen), self.rest_port)
        await self._update_health()
        await server.start()
        self._server = server
        self._health_task = asyncio.create_task(self._watch_health())
        if self.metrics.multiprocess:
            self._metrics_sync_task = asyncio.create_task(self._sync_metrics())
        if self._metrics_port is not None:
            self.metrics_http_host, self.metrics_http_port = self.metrics.serve_http(
                self._metrics_port, self._metrics_host
            )
            log.info("metrics on %s:%d", self.metrics_http_host, self.metrics_http_port)
        log.info(
            "serving %s on %s (%s, %s, at most %d concurrent calls)",
            SERVICE_NAME,
            self._listen,
            ("mutual TLS" if self._tls.mutual else "TLS") if self._tls else "plaintext",
            f"bearer tokens: {len(self._tokens)}" if self._tokens else "no authentication",
            self._limit.limit,
        )

    async def _update_health(self) -> None:
        try:
            async with asyncio.timeout(self._db_timeout):
                await self._repository.ping()
            serving, reason = True, ""
        except ReadModelUnavailable as exc:
            serving, reason = False, str(exc)
        except TimeoutError:
            serving, reason = False, f"no answer within {self._db_timeout:g}s"
        if serving != self._serving:
            if serving:
                log.info("read model ready: SERVING")
            else:
                log.warning("read model not ready (%s): NOT_SERVING", reason)
        self._serving = serving
        self.metrics.read_model_up.set(1 if serving else 0)
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME, DIRECTORY_SERVICE_NAME):
            await self._health.set(name, status)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval)
            try:
                await self._update_health()
            except Exception:  # a probe must never stop probing
                log.exception("health probe failed")

    async def _sync_metrics(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.metrics.sync()

    async def stop(self) -> None:
        """Stop accepting calls, let in-flight calls finish within the grace period, then give
        the connections the repository holds back to the engine's pool."""
        server, self._server = self._server, None
        if server is None:
            return
        for task in (self._health_task, self._metrics_sync_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._health.enter_graceful_shutdown()
        rest_site, self._rest = self._rest, None
        # Both drain at once, each within the grace period.
        await asyncio.gather(server.stop(self._grace), rest_site.stop() if rest_site else _done())
        self.metrics.sync()  # a worker's last figures, for the supervisor to add up
        if self._commands is not None:
            await self._commands.stop()
        # Calls past the grace were cut; their queries may still wait on the database (a lock,
        # a server that hangs): the drain ends near its grace whatever the database does.
        await self._repository.release_connections(within_s=_RELEASE_S)
        self.metrics.stop_http()
        log.info("stopped")
        self._stopped.set()

    async def wait(self) -> None:
        """Until stop() has finished (returns at once if the server never started)."""
        if self._server is not None:
            await self._stopped.wait()

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def security_of(settings: Settings) -> tuple[ServerTls | None, BearerTokens | None]:
    """The server's TLS and bearer tokens, read from the files the settings name; raises
    TlsConfigError or TokenConfigError naming the file that cannot be used (`serve` calls it
    once before it forks its workers, so a missing file is one line at once)."""
    tokens = load_tokens(
        settings.api_tokens.get_secret_value() if settings.api_tokens else None,
        settings.api_tokens_file,
    )
    tls = ServerTls.from_files(
        settings.api_tls_cert_file, settings.api_tls_key_file, settings.api_tls_client_ca_file
    )
    if tls is not None:
        tls.ssl_context()  # reads every file and checks the key is the certificate's
    return tls, BearerTokens(tokens) if tokens else None


def _connection_options(
    max_age_s: float, max_age_grace_s: float, keepalive_s: float
) -> list[tuple[str, int]]:
    """gRPC core's channel arguments for the life of client connections (0: gRPC's default,
    no limit and no pings)."""
    options: list[tuple[str, int]] = [
        # Clients may ping every 10 s, calls or not (a client's keepalive below this would be
        # answered with GOAWAY "too_many_pings").
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if max_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(max_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max_age_grace_s * 1000)),
        ]
    if keepalive_s > 0:
        options += [
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
    return options
