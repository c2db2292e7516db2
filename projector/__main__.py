"""conntrack-projector: fold the events topic into the read model until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from connection_tracker import cli
from connection_tracker.batch import gen0_threshold
from connection_tracker.database import create_engine
from connection_tracker.lifecycle import (
    on_shutdown_signal,
    setup_logging,
    tune_gc,
)
from connection_tracker.settings import Settings
from connection_tracker.store import ProjectionStore
from projector.runner import Abandoned, Projector

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
        ("kafka", "database", "projector", "retention", "metrics", "logging"),
    )
    ns = parser.parse_args(argv)
    try:
        settings = cli.settings_from_args(ns)
    except cli.CommandError as exc:
        cli.fail("conntrack-projector", exc)
    setup_logging(settings.log_level, settings.log_format)
    tune_gc(settings.gc_gen0_threshold, default=gen0_threshold(settings.batch_max_events))
    cli.run("conntrack-projector", lambda: _serve(settings), settings)


async def _serve(settings: Settings) -> int:
    await serve(settings)
    return cli.Exit.OK


if __name__ == "__main__":
    main()
