"""conntrack-lifecycle: tell every connection's opened and closed, exactly once, on the lifecycle
topic, and fence gateway nodes silent for longer than the lease, until SIGTERM/SIGINT.

One process at a time holds the role (a second one started takes it over from the first); its
first start tells the whole history of the events topic. `conntrack-lifecycle webhook` POSTs
the lifecycle stream to an HTTP endpoint instead of Kafka consumers. See docs/lifecycle.md."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from conntrack.core import cli
from conntrack.core.process import on_shutdown_signal
from conntrack.core.retry import Abandoned
from conntrack.core.settings import Settings, env_name
from conntrack.lifecycle.runner import LifecycleRole, MissingTopicError, Superseded
from conntrack.lifecycle.webhook import WebhookSink

log = logging.getLogger("lifecycle")


async def serve(settings: Settings) -> int:
    role = LifecycleRole(settings)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=role.metrics.registry)
    on_shutdown_signal(role.stop)
    s = settings
    log.info(
        "event=starting events_topic=%s lifecycle_topic=%s state_topic=%s group=%s "
        "transactional_id=%s bootstrap=%s node_lease_seconds=%g metrics_port=%d",
        s.events_topic,
        s.lifecycle_topic,
        s.lifecycle_state_topic,
        s.lifecycle_group,
        s.lifecycle_transactional_id,
        s.kafka_bootstrap_servers,
        s.node_lease_seconds,
        s.metrics_port,
    )
    try:
        await role.run()
    except Abandoned:
        log.info("event=abandoned_start: stopped before the broker could be reached")
    except Superseded as exc:
        log.warning("event=superseded: %s; stopping", exc)
        return cli.Exit.UNAVAILABLE
    except MissingTopicError as exc:
        raise cli.CommandError(str(exc), cli.Exit.USAGE) from None
    log.info("stopped cleanly")
    return cli.Exit.OK


async def webhook(settings: Settings) -> int:
    try:
        sink = WebhookSink(settings)
    except ValueError:
        raise cli.CommandError(
            f"no webhook URL: set {env_name('webhook_url')} (or --webhook-url)", cli.Exit.USAGE
        ) from None
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=sink.metrics.registry)
    on_shutdown_signal(sink.stop)
    log.info(
        "event=starting lifecycle_topic=%s url=%s group=%s signed=%s dead_letter_topic=%s",
        settings.lifecycle_topic,
        settings.webhook_url,
        settings.webhook_group,
        settings.webhook_secret is not None,
        settings.webhook_dead_letter_topic,
    )
    try:
        await sink.run()
    except Abandoned as exc:
        log.info("event=abandoned_start cause=%s: stopped before it could read the stream", exc)
    log.info("stopped cleanly delivered=%d", sink.delivered)
    return cli.Exit.OK


def main(argv: list[str] | None = None) -> None:
    prog = "conntrack-lifecycle"
    sections = ("kafka", "lifecycle", "liveness", "metrics", "logging")
    parser = cli.parser(prog, __doc__, sections)
    sub = parser.add_subparsers(dest="command", metavar="{webhook}")
    hook = sub.add_parser(
        "webhook",
        help="POST each lifecycle event, signed, to an HTTP endpoint (at least once)",
        description=WebhookSink.__doc__ or None,
    )
    cli.add_settings(hook, ("kafka", "lifecycle", "webhook", "metrics", "logging"))
    ns = parser.parse_args(argv)
    settings = cli.start(prog, ns, gen0_threshold=None)
    body = webhook if ns.command == "webhook" else serve
    cli.run(prog, lambda: body(settings), settings)


if __name__ == "__main__":
    main()
