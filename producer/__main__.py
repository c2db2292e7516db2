"""conntrack-producer: provision topics, and publish simulated gateway traffic."""

# topics: the events and dead-letter topics keep history; the commands and outcomes topics are
# transient (--command-retention-ms), see producer/topics.py.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time

from conntrack.core import cli
from conntrack.core.events import Event
from conntrack.core.kafka import KafkaConnection
from conntrack.core.process import (
    BATCH_GEN0_THRESHOLD,
    on_shutdown_signal,
)
from conntrack.core.settings import Settings, default
from conntrack.producer.errors import PublisherError
from conntrack.producer.publisher import Publisher
from conntrack.producer.simulator import Workload, generate
from conntrack.producer.topics import (
    HistoryLosingTopicError,
    TopicProvisioningError,
    TopicReport,
    TopicSpec,
    broker_count,
    default_replication,
    ensure_topics,
    lifecycle_specs,
)


async def provision(settings: Settings, ns: argparse.Namespace) -> int:
    try:
        extra = tuple(_config(text) for text in ns.config)
        replication, min_isr = default_replication(
            await broker_count(KafkaConnection.from_settings(settings, "topics"))
        )
        if ns.replication_factor is not None:
            replication = ns.replication_factor
            min_isr = 2 if replication >= 3 else 1
        if ns.min_insync_replicas is not None:
            min_isr = ns.min_insync_replicas
        specs = [
            TopicSpec(
                settings.events_topic,
                ns.partitions,
                replication,
                min_isr,
                log_append_time=True,
                extra_configs=extra,
            ),
            TopicSpec(settings.dead_letter_topic, ns.partitions, replication, min_isr),
        ] + [
            TopicSpec(
                name,
                ns.partitions,
                replication,
                min_isr,
                retention_ms=ns.command_retention_ms,
            )
            for name in (settings.commands_topic, settings.command_outcomes_topic)
        ]
        specs += lifecycle_specs(
            settings.lifecycle_topic,
            settings.lifecycle_state_topic,
            ns.partitions,
            replication,
            min_isr,
        )
        reports = await ensure_topics(KafkaConnection.from_settings(settings, "topics"), specs)
    except HistoryLosingTopicError as exc:
        _print_reports(exc.reports, ns.format)
        print(f"error: {exc}", file=sys.stderr)
        return cli.Exit.NEGATIVE
    except (TopicProvisioningError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return cli.Exit.USAGE
    _print_reports(reports, ns.format)
    return cli.Exit.OK


def _config(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--config {text!r}: use KEY=VALUE (a Kafka topic config)")
    return key.strip(), value.strip()


def _print_reports(reports: list[TopicReport], form: str) -> None:
    for report in reports:
        print(json.dumps(dataclasses.asdict(report)) if form == "json" else report)


class Progress:
    """A line on stderr every `interval_s` while publishing (stdout stays for results)."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._started = self._last = time.monotonic()

    def tick(
        self, published: int, open_connections: int, publisher: Publisher, *, final: bool = False
    ) -> None:
        now = time.monotonic()
        if self._interval_s <= 0 or (not final and now - self._last < self._interval_s):
            return
        self._last = now
        elapsed = max(now - self._started, 1e-9)
        stats = publisher.stats()
        print(
            f"simulate: {published} events in {elapsed:.1f} s ({published / elapsed:.0f}/s), "
            f"{open_connections} open connections, {stats.delivered} acknowledged, "
            f"{stats.undelivered} undelivered",
            file=sys.stderr,
            flush=True,
        )


async def simulate(settings: Settings, ns: argparse.Namespace) -> int:
    try:
        workload = Workload(
            gateways=ns.gateways,
            connections=ns.connections,
            activities_per_connection=ns.activities,
            disconnect_ratio=ns.disconnect_ratio,
            seed=ns.seed,
            concurrent=ns.concurrent,
            connect_rate=ns.connect_rate,
            activity_rate=ns.activity_rate,
            duration_s=ns.duration,
            max_events=ns.events,
            ipv6_share=ns.ipv6_share,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return cli.Exit.USAGE
    stop = asyncio.Event()

    async def request_stop() -> None:
        stop.set()

    on_shutdown_signal(request_stop)
    count = 0
    open_ids: dict[str, None] = {}  # insertion-ordered: the last one is the newest
    progress = Progress(ns.progress_interval)
    start_ns = time.time_ns()
    publisher = Publisher(
        KafkaConnection.from_settings(settings, "simulator"),
        settings.events_topic,
        "simulator",
        delivery_timeout_s=ns.delivery_timeout,
    )
    try:
        async with publisher:
            for event in generate(workload, start_ns, order="time"):
                if stop.is_set():
                    break
                if ns.realtime:
                    await _wait_until(event, stop)
                await publisher.publish(event)
                count += 1
                if event.kind == "connected":
                    open_ids[event.connection_id] = None
                elif event.kind == "disconnected":
                    open_ids.pop(event.connection_id, None)
                progress.tick(count, len(open_ids), publisher)
            await publisher.flush()
            progress.tick(count, len(open_ids), publisher, final=True)
    except PublisherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return cli.Exit.UNAVAILABLE
    newest_open = next(reversed(open_ids)) if open_ids else None
    if ns.format == "json":
        summary = {
            "published": count,
            "connections": workload.connections,
            "topic": settings.events_topic,
            "open_connections": len(open_ids),
            "an_open_connection": newest_open,
        }
        print(json.dumps(summary))
        return cli.Exit.OK
    print(
        f"published {count} events for {workload.connections} connections "
        f"to {settings.events_topic}"
    )
    if newest_open is not None:
        print(f"an open connection: {newest_open}")
    return cli.Exit.OK


async def _wait_until(event: Event, stop: asyncio.Event) -> None:
    delay = (event.occurred_at_ns - time.time_ns()) / 1e9
    if delay > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


def main(argv: list[str] | None = None) -> None:
    prog = "conntrack-producer"
    sections = ("kafka", "logging")
    parser = cli.parser(prog, __doc__, sections)
    sub = parser.add_subparsers(dest="command", required=True)
    topics = sub.add_parser(
        "topics",
        help="create the events, dead-letter, commands, command-outcomes and lifecycle topics "
        "(idempotent); refuse history-losing ones",
    )
    topics.add_argument("--partitions", type=int, default=6)
    topics.add_argument(
        "--replication-factor",
        type=int,
        help="default: the smaller of 3 and the number of brokers",
    )
    topics.add_argument(
        "--min-insync-replicas",
        type=int,
        help="default: 2 with 3 or more replicas, else 1",
    )
    topics.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another topic config for the events topic (repeatable); settings that can lose "
        "acknowledged records (unclean.leader.election.enable=true) are refused",
    )
    topics.add_argument(
        "--command-retention-ms",
        type=int,
        default=86_400_000,
        help="retention of the commands and command-outcomes topics, ms (they are not history)",
    )
    topics.add_argument("--format", choices=("table", "json"), default="table")
    sim = sub.add_parser("simulate", help="publish simulated gateway traffic")
    sim.add_argument("--gateways", type=int, default=3)
    sim.add_argument("--connections", type=int, default=100, help="connections opened in total")
    sim.add_argument("--concurrent", type=int, default=None, help="most connections open at once")
    sim.add_argument("--activities", type=int, default=5, help="activity events per connection")
    sim.add_argument("--disconnect-ratio", type=float, default=0.5, help="share that disconnect")
    sim.add_argument("--connect-rate", type=float, default=100.0, help="new connections per second")
    sim.add_argument("--activity-rate", type=float, default=1.0, help="activities/s per connection")
    sim.add_argument("--ipv6-share", type=float, default=0.3)
    sim.add_argument(
        "--duration", type=float, default=None, help="stop after this many simulated seconds"
    )
    sim.add_argument("--events", type=int, default=None, help="stop after this many events")
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument(
        "--realtime", action="store_true", help="publish each event at its simulated time"
    )
    sim.add_argument(
        "--delivery-timeout",
        type=float,
        default=default("gateway_delivery_timeout_seconds"),
        help="seconds",
    )
    sim.add_argument("--format", choices=("table", "json"), default="table")
    sim.add_argument(
        "--progress-interval",
        type=float,
        default=2.0,
        help="seconds between progress lines; 0: none",
    )
    cli.add_settings(topics, (*sections, "lifecycle"))
    cli.add_settings(sim, sections)
    ns = parser.parse_args(argv)
    settings = cli.start(prog, ns, gen0_threshold=BATCH_GEN0_THRESHOLD)
    run = provision if ns.command == "topics" else simulate
    cli.run(prog, lambda: run(settings, ns), settings)


if __name__ == "__main__":
    main()
