"""conntrack-projector: fold the events topic into the read model until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from conntrack.core import cli
from conntrack.core.batch import gen0_threshold
from conntrack.core.database import create_engine
from conntrack.core.process import (
    on_shutdown_signal,
)
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.core.tracing_setup import run_traced
from conntrack.projector.runner import Abandoned, Projector

log = logging.getLogger("projector")


async def serve(settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    try:
        projector = Projector(settings, ProjectionStore(engine))
        if settings.metrics_port:
            start_http_server(settings.metrics_port, registry=projector.metrics.registry)
        # Installed before connecting: SIGTERM while the broker is still unreachable is a
        # clean stop too.
        on_shutdown_signal(projector.stop)
        s = settings
        log.info(
            "event=starting topic=%s dead_letter_topic=%s group=%s bootstrap=%s database=%s "
            "batch_max_events=%d batch_max_wait_ms=%d retention_disconnected_seconds=%d "
            "retention_tombstone_seconds=%d metrics_port=%d",
            s.events_topic,
            s.dead_letter_topic,
            s.consumer_group,
            s.kafka_bootstrap_servers,
            engine.url.render_as_string(hide_password=True),
            s.batch_max_events,
            s.batch_max_wait_ms,
            s.retention_disconnected_seconds,
            s.retention_tombstone_seconds,
            s.metrics_port,
        )
        try:
            async with projector:
                await projector.run()
        except Abandoned:
            log.info("event=abandoned_start: stopped before the broker could be reached")
        log.info("stopped cleanly")
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(
        "conntrack-projector",
        __doc__,
        ("kafka", "database", "projector", "retention", "history", "metrics", "logging"),
    )
    ns = parser.parse_args(argv)
    settings = cli.start(
        "conntrack-projector", ns, gen0_threshold=lambda s: gen0_threshold(s.batch_max_events)
    )
    cli.run(
        "conntrack-projector",
        lambda: run_traced("conntrack-projector", _serve(settings), database=True),
        settings,
    )


async def _serve(settings: Settings) -> int:
    await serve(settings)
    return cli.Exit.OK


if __name__ == "__main__":
    main()
