"""conntrack-gateway: the reference WebSocket gateway. Accepts clients on CONNTRACK_GATEWAY_LISTEN,
publishes their connected / activity / disconnected events as a gateway node (node role), and
executes the API's Send and Disconnect for its sockets. SIGTERM or SIGINT closes every socket
with 1001 (going away), publishes the Disconnected events and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket

from prometheus_client import start_http_server
from websockets.asyncio.server import serve as serve_websockets

from conntrack.core import cli
from conntrack.core.kafka import KafkaConnection
from conntrack.core.process import (
    GATEWAY_GEN0_THRESHOLD,
    on_shutdown_signal,
)
from conntrack.core.settings import Settings, env_name
from conntrack.core.tracing_setup import run_traced
from conntrack.gateway.handshake import HandshakeConfigError, Handshakes
from conntrack.gateway.metrics import gateway_registry
from conntrack.gateway.server import Gateway, websockets_logger
from conntrack.producer.commands import NodeCommands
from conntrack.producer.errors import (
    BrokerUnavailableError,
    PublisherError,
    SpoolError,
    TopicNotFoundError,
)
from conntrack.producer.publisher import Publisher

log = logging.getLogger("gateway")


def _host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise cli.CommandError(
            f"CONNTRACK_GATEWAY_LISTEN / --gateway-listen = {listen!r}: use HOST:PORT",
            cli.Exit.USAGE,
        )
    return host.strip("[]") or "0.0.0.0", int(port)


async def run(settings: Settings) -> int:
    host, port = _host_port(settings.gateway_listen)
    node_id = settings.gateway_node_id or socket.gethostname()
    stop = asyncio.Event()
    main = asyncio.current_task()
    starting = True

    async def request_stop() -> None:
        stop.set()
        if starting and main is not None:
            main.cancel()  # waiting for the broker: give up the start at once

    on_shutdown_signal(request_stop)
    try:
        kafka = KafkaConnection.from_settings(settings, "gateway")
        publisher = Publisher(
            kafka,
            settings.events_topic,
            settings.gateway_id,
            node_id=node_id,
            heartbeat_interval_s=settings.gateway_heartbeat_seconds,
            delivery_timeout_s=settings.gateway_delivery_timeout_seconds,
            spool_dir=settings.gateway_spool_dir,
            spool_max_bytes=settings.gateway_spool_max_bytes,
        )
        handshakes = Handshakes(
            settings.gateway_auth,
            key_file=settings.gateway_jwt_key_file,
            principal_claim=settings.gateway_jwt_principal_claim,
            audience=settings.gateway_jwt_audience,
            issuer=settings.gateway_jwt_issuer,
            principal_header=settings.gateway_principal_header,
            labels=settings.gateway_labels,
        )
    except HandshakeConfigError as exc:
        # Named as the operator sets them: CONNTRACK_GATEWAY_JWT_KEY_FILE, not the field.
        message = re.sub(r"\bgateway_[a-z_]+", lambda m: env_name(m.group(0)), str(exc))
        raise cli.CommandError(f"cannot start: {message}", cli.Exit.USAGE) from None
    except ValueError as exc:
        raise cli.CommandError(f"cannot start: {exc}", cli.Exit.USAGE) from None
    try:
        async with publisher:
            gateway = Gateway(
                publisher,
                handshakes,
                idle_timeout_s=settings.gateway_idle_timeout_seconds,
                max_lifetime_s=settings.gateway_max_lifetime_seconds,
            )
            commands = NodeCommands(
                kafka,
                node_id,
                lambda: publisher.incarnation,
                gateway,
                commands_topic=settings.commands_topic,
                outcomes_topic=settings.command_outcomes_topic,
                linger_ms=settings.commands_linger_ms,
                fetch_wait_ms=settings.commands_fetch_wait_ms,
            )
            if settings.metrics_port:
                registry = gateway_registry(gateway, publisher.stats, commands.stats)
                start_http_server(settings.metrics_port, registry=registry)
            async with commands:
                try:
                    server = await serve_websockets(
                        gateway.handle,
                        host,
                        port,
                        process_request=gateway.check_handshake,
                        process_response=gateway.add_connection_id,
                        close_timeout=5,
                        logger=websockets_logger(),
                    )
                except OSError as exc:
                    raise cli.CommandError(
                        f"cannot listen on {settings.gateway_listen}: {exc}", cli.Exit.USAGE
                    ) from None
                async with server:
                    bound = sorted({s.getsockname()[1] for s in server.sockets})
                    log.info(
                        "event=listening listen=%s port=%s node_id=%s incarnation=%s "
                        "commands_partition=%s",
                        settings.gateway_listen,
                        ",".join(map(str, bound)),
                        node_id,
                        publisher.incarnation,
                        commands.partition,
                    )
                    print(f"listening on ws://{host}:{bound[0]}/ as node {node_id}", flush=True)
                    starting = False
                    sweeping = asyncio.create_task(gateway.sweep())
                    await stop.wait()
                    sweeping.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sweeping
                    # Closing the server closes every socket with 1001 (going away) and waits
                    # for the handlers, which publish the Disconnected events.
                    gateway.shutting_down()
                    server.close()
                    await server.wait_closed()
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
        log.info("event=abandoned_start: stopped before the gateway was listening")
    except SpoolError as exc:
        raise cli.CommandError(
            f"{exc}; check {env_name('gateway_spool_dir')}", cli.Exit.USAGE
        ) from None
    except TopicNotFoundError as exc:
        raise cli.CommandError(str(exc), cli.Exit.USAGE) from None
    except BrokerUnavailableError as exc:
        raise cli.CommandError(
            f"cannot reach the Kafka broker at {settings.kafka_bootstrap_servers} ({exc}); check "
            f"{env_name('kafka_bootstrap_servers')} and that the broker is up",
            cli.Exit.UNAVAILABLE,
        ) from None
    except PublisherError as exc:
        raise cli.CommandError(str(exc), cli.Exit.UNAVAILABLE) from None
    return cli.Exit.OK


def main(argv: list[str] | None = None) -> None:
    prog = "conntrack-gateway"
    sections = ("kafka", "gateway", "metrics", "logging")
    parser = cli.parser(prog, __doc__, sections)
    ns = parser.parse_args(argv)
    settings = cli.start(prog, ns, gen0_threshold=GATEWAY_GEN0_THRESHOLD)
    cli.run(prog, lambda: run_traced(prog, run(settings)), settings)


if __name__ == "__main__":
    main()
