"""The event mixes the scenarios replay, built from producer.simulator.generate() (so they are
reproducible from the seed) and loaded into a topic fast.

generate() yields each connection's events together. Live traffic interleaves connections, so a
projector batch touches thousands of different connections; the mixes restore that by taking
the connections in windows and emitting their events round-robin (each connection's own events
stay in order). That is the hard case for the projector: little coalescing within a batch."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from conntrack.core.events import HEADERS, Event, encode
from conntrack.producer.simulator import Workload, generate

T = TypeVar("T")
Record = tuple[bytes, bytes]  # (key = connection id, value = encoded ConnectionEvent)

# 2026-01-01T00:00:00Z: fixed, so a seed gives byte-identical records in every run.
START_NS: Final = 1_767_225_600_000_000_000
# Connections whose lifetimes overlap in the churn and history mixes.
CHURN_WINDOW: Final = 10_000


@dataclass(frozen=True)
class Mix:
    name: str
    description: str
    workload: Workload
    window: int  # connections interleaved round-robin

    def iter_records(self, start_ns: int = START_NS) -> Iterator[Record]:
        """The records in publishing order, generated as they are consumed: only one window
        of connections is held in memory at a time."""
        groups = iter_groups(generate(self.workload, start_ns))
        for window in batched(groups, self.window):
            for e in interleave(window, self.window):
                yield e.connection_id.encode(), encode(e)

    def records(self, start_ns: int = START_NS) -> list[Record]:
        return list(self.iter_records(start_ns))


def activity_heavy(events: int, seed: int = 1) -> Mix:
    """Connect, then nine activities each: 90% activity, all connections live throughout."""
    connections = max(1, events // 10)
    return Mix(
        "activity-heavy",
        f"{connections:,} live connections, 1 connect + 9 activities each (90% activity), "
        "round-robin over all of them",
        Workload(
            connections=connections, activities_per_connection=9, disconnect_ratio=0.0, seed=seed
        ),
        connections,
    )


def churn_heavy(events: int, seed: int = 1) -> Mix:
    """Every connection connects, is active once, disconnects."""
    connections = max(1, events // 3)
    window = min(CHURN_WINDOW, connections)
    return Mix(
        "churn-heavy",
        f"{connections:,} connections, each connect + 1 activity + disconnect, "
        f"lifetimes overlapping in windows of {window:,}",
        Workload(
            connections=connections, activities_per_connection=1, disconnect_ratio=1.0, seed=seed
        ),
        window,
    )


def churn_labelled(events: int, seed: int = 1) -> Mix:
    """churn_heavy() with a principal and two labels (tenant, device) on every connection: the
    same events otherwise, so the two measure what the label index costs."""
    plain = churn_heavy(events, seed)
    connections = plain.workload.connections
    principals = max(1, connections // 5)
    return Mix(
        "churn-heavy, labelled",
        f"{plain.description}; each of {principals:,} principals, labels tenant and device",
        Workload(
            connections=connections,
            activities_per_connection=1,
            disconnect_ratio=1.0,
            seed=seed,
            principals=principals,
        ),
        plain.window,
    )


def mixed_history(events: int, seed: int = 1) -> Mix:
    """The simulator's default shape (5 activities, half disconnect) at a given size."""
    connections = max(1, round(events / 6.5))
    window = min(CHURN_WINDOW, connections)
    return Mix(
        "mixed history",
        f"{connections:,} connections, 1 connect + 5 activities each, half disconnect, "
        f"lifetimes overlapping in windows of {window:,}",
        Workload(
            connections=connections, activities_per_connection=5, disconnect_ratio=0.5, seed=seed
        ),
        window,
    )


def connected_only(connections: int, seed: int = 1) -> Mix:
    """One Connected per connection: every connection live."""
    return Mix(
        "live connections",
        f"{connections:,} Connected events, no activity or disconnect",
        Workload(
            connections=connections, activities_per_connection=0, disconnect_ratio=0.0, seed=seed
        ),
        # One event per connection: every window gives the same order, and a small one keeps
        # the harness from holding a million events at once.
        min(CHURN_WINDOW, connections),
    )


def iter_groups(events: Iterable[Event]) -> Iterator[list[Event]]:
    """Consecutive events of one connection, as generate() yields them, into one list each."""
    group: list[Event] = []
    for event in events:
        if group and event.connection_id != group[0].connection_id:
            yield group
            group = []
        group.append(event)
    if group:
        yield group


def group_by_connection(events: Iterable[Event]) -> list[list[Event]]:
    return list(iter_groups(events))


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, max(1, size))):
        yield chunk


def interleave(groups: Sequence[Sequence[T]], window: int) -> Iterator[T]:
    """Round-robin over the groups, `window` groups at a time; each group keeps its order."""
    for start in range(0, len(groups), max(1, window)):
        chunk = groups[start : start + window]
        longest = max((len(g) for g in chunk), default=0)
        for i in range(longest):
            for g in chunk:
                if i < len(g):
                    yield g[i]


async def publish_records(bootstrap: str, topic: str, records: Iterable[Record]) -> int:
    """Append records to the topic as fast as this process can, keyed like the Publisher (the
    default murmur2 partitioner, so each connection stays on one partition, in order).

    Batches are built by hand (create_batch/send_batch): send() per record costs several times
    more Python per event and would make loading, not the measurement, the long part."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        max_batch_size=512 * 1024,
        max_request_size=1024 * 1024,
    )
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        partitioner = DefaultPartitioner()
        partition_of: dict[bytes, int] = {}
        builders: dict[int, Any] = {}  # aiokafka's BatchBuilder, untyped
        delivered: list[asyncio.Future[object]] = []
        headers = list(HEADERS)
        count = 0
        for key, value in records:
            partition = partition_of.get(key)
            if partition is None:
                partition = partition_of[key] = partitioner(key, partitions, partitions)
            builder = builders.get(partition) or producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                delivered.append(await producer.send_batch(builder, topic, partition=partition))
                builder = producer.create_batch()
                builder.append(key=key, value=value, timestamp=None, headers=headers)
            builders[partition] = builder
            count += 1
            if len(delivered) >= 32:  # bound what is queued in memory
                await asyncio.gather(*delivered)
                delivered.clear()
        for partition, builder in builders.items():
            if builder.record_count():
                delivered.append(await producer.send_batch(builder, topic, partition=partition))
        await asyncio.gather(*delivered)
        return count
    finally:
        await producer.stop()
