"""conntrack-producer: provision topics, and publish simulated gateway traffic."""

from __future__ import annotations

import argparse
import asyncio
import sys

from connection_tracker.lifecycle import setup_logging
from connection_tracker.settings import Settings
from producer.publisher import Publisher
from producer.simulator import Workload, generate
from producer.topics import HistoryLosingTopicError, TopicSpec, ensure_topics


async def provision(settings: Settings, ns: argparse.Namespace) -> int:
    specs = [
        TopicSpec(settings.events_topic, ns.partitions, ns.replication_factor, ns.min_insync_replicas),
        TopicSpec(settings.dead_letter_topic, ns.partitions, ns.replication_factor, ns.min_insync_replicas),
    ]
    try:
        for line in await ensure_topics(settings.kafka_bootstrap_servers, specs):
            print(line)
    except HistoryLosingTopicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


async def simulate(settings: Settings, ns: argparse.Namespace) -> int:
    workload = Workload(
        gateways=ns.gateways,
        connections=ns.connections,
        activities_per_connection=ns.activities,
        disconnect_ratio=ns.disconnect_ratio,
        seed=ns.seed,
    )
    count = 0
    last_open: str | None = None
    async with Publisher(settings.kafka_bootstrap_servers, settings.events_topic, "simulator") as pub:
        open_ids: set[str] = set()
        for event in generate(workload):
            await pub.publish(event)
            count += 1
            if event.kind == "connected":
                open_ids.add(event.connection_id)
                last_open = event.connection_id
            elif event.kind == "disconnected":
                open_ids.discard(event.connection_id)
        await pub.flush()
        if last_open not in open_ids:
            last_open = next(iter(sorted(open_ids)), None)
    print(f"published {count} events for {workload.connections} connections to {settings.events_topic}")
    if last_open:
        print(f"an open connection: {last_open}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="conntrack-producer", description=__doc__)
    parser.add_argument("--bootstrap-servers", help="overrides CONNTRACK_KAFKA_BOOTSTRAP_SERVERS")
    sub = parser.add_subparsers(dest="command", required=True)
    topics = sub.add_parser("topics", help="create the events and dead-letter topics")
    topics.add_argument("--partitions", type=int, default=6)
    topics.add_argument("--replication-factor", type=int, default=1)
    topics.add_argument("--min-insync-replicas", type=int, default=1)
    sim = sub.add_parser("simulate", help="publish simulated gateway traffic")
    sim.add_argument("--gateways", type=int, default=3)
    sim.add_argument("--connections", type=int, default=100)
    sim.add_argument("--activities", type=int, default=5, help="activity events per connection")
    sim.add_argument("--disconnect-ratio", type=float, default=0.5)
    sim.add_argument("--seed", type=int, default=1)
    ns = parser.parse_args(argv)
    settings = (
        Settings(kafka_bootstrap_servers=ns.bootstrap_servers) if ns.bootstrap_servers else Settings()
    )
    setup_logging(settings.log_level)
    run = provision if ns.command == "topics" else simulate
    sys.exit(asyncio.run(run(settings, ns)))


if __name__ == "__main__":
    main()
