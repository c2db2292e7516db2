"""conntrack-lifecycle: tell every connection's opened and closed, exactly once, on the lifecycle
topic, and fence gateway nodes silent for longer than the lease, until SIGTERM/SIGINT.

One process at a time holds the role (a second one started takes it over from the first); its
first start tells the whole history of the events topic. See docs/lifecycle.md."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from conntrack.core import cli
from conntrack.core.process import on_shutdown_signal
from conntrack.core.retry import Abandoned
from conntrack.core.settings import Settings
from conntrack.lifecycle.runner import LifecycleRole, Superseded

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
    log.info("stopped cleanly")
    return cli.Exit.OK


def main(argv: list[str] | None = None) -> None:
    prog = "conntrack-lifecycle"
    parser = cli.parser(prog, __doc__, ("kafka", "lifecycle", "liveness", "metrics", "logging"))
    ns = parser.parse_args(argv)
    settings = cli.start(prog, ns, gen0_threshold=None)
    cli.run(prog, lambda: serve(settings), settings)


if __name__ == "__main__":
    main()
