"""conntrack-projector: fold the events topic into the read model until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging

from prometheus_client import start_http_server

from connection_tracker.database import create_engine
from connection_tracker.lifecycle import on_shutdown_signal, setup_logging
from connection_tracker.settings import Settings
from projector.runner import Projector
from projector.store import ProjectionStore

log = logging.getLogger("projector")


async def serve(settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    try:
        projector = Projector(settings, ProjectionStore(engine))
        if settings.metrics_port:
            start_http_server(settings.metrics_port, registry=projector.metrics.registry)
        async with projector:
            on_shutdown_signal(projector.stop)
            log.info(
                "projecting %s from %s into %s",
                settings.events_topic,
                settings.kafka_bootstrap_servers,
                engine.url.render_as_string(hide_password=True),
            )
            await projector.run()
        log.info("stopped cleanly")
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="conntrack-projector", description=__doc__)
    parser.add_argument("--database-url", help="overrides CONNTRACK_DATABASE_URL")
    parser.add_argument("--bootstrap-servers", help="overrides CONNTRACK_KAFKA_BOOTSTRAP_SERVERS")
    parser.add_argument("--metrics-port", type=int, help="overrides CONNTRACK_METRICS_PORT")
    ns = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "database_url": ns.database_url,
            "kafka_bootstrap_servers": ns.bootstrap_servers,
            "metrics_port": ns.metrics_port,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
