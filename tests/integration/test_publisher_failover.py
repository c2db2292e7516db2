"""System test on a private three-broker KRaft cluster (infra/kafka.sh cluster): while one
partition has no leader, a Publisher's calls for connections on the other partitions still go
through (issue #16: behind one send lock, every call waited for that one partition), each
connection's events keep their order, and every acknowledged event is in the log once.

The topic has one replica per partition, partition p on node p + 1: killing node 1 takes
partition 0 away until node 1 is back, and leaves the other partitions (and their
acknowledgements) alone, so the outage lasts exactly as long as the test wants."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from conntrack.core.events import Activity, Connected, Event, decode
from conntrack.core.kafka import partition_of
from conntrack.producer.publisher import Publisher
from tests.support.cluster import Cluster
from tests.support.kafka import read_all, unique

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.cluster]

PARTITIONS = 3
PER_PARTITION = 4  # connections
T0 = 1_700_000_000_000_000_000


async def create_topic_one_replica_per_node(cluster: Cluster) -> str:
    topic = unique("events")
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    try:
        assignment = {p: [p + 1] for p in range(PARTITIONS)}
        response = await admin.create_topics([NewTopic(topic, -1, -1, assignment)])
        assert [e[1] for e in response.topic_errors] == [0], response
    finally:
        await admin.close()
    for _ in range(60):
        described = (await cluster.describe([topic])).get(topic, [])
        if sorted((p["partition"], p["leader"]) for p in described) == [(0, 1), (1, 2), (2, 3)]:
            return topic
        await asyncio.sleep(0.5)
    raise AssertionError(f"topic {topic} did not get its leaders: {described}")


def connections_by_partition() -> dict[int, list[str]]:
    found: dict[int, list[str]] = defaultdict(list)
    n = 0
    while any(len(found[p]) < PER_PARTITION for p in range(PARTITIONS)):
        conn = f"conn-{n}"
        n += 1
        partition = partition_of(conn.encode(), PARTITIONS)
        if len(found[partition]) < PER_PARTITION:
            found[partition].append(conn)
    return found


async def test_a_partition_without_a_leader_holds_up_only_its_own_connections(
    cluster: Cluster,
) -> None:
    await cluster.up()
    topic = await create_topic_one_replica_per_node(cluster)
    conns = connections_by_partition()
    handed: dict[str, list[Event]] = defaultdict(list)
    undeliverable: list[Event] = []
    seq = 0

    def event(conn: str, payload: Activity | Connected) -> Event:
        nonlocal seq
        seq += 1
        return Event(str(uuid.uuid4()), conn, "failover-test", T0 + seq, payload)

    async def publish(pub: Publisher, conn: str, payload: Activity | Connected) -> None:
        e = event(conn, payload)
        await pub.publish(e)
        handed[conn].append(e)

    # 16 KiB batches (aiokafka's default, not the publisher's): partition 0's batch fills
    # within a few hundred events, and then a send for it waits until it has a leader again.
    pub = Publisher(
        cluster.bootstrap,
        topic,
        "failover-test",
        activity_interval_s=0,
        delivery_timeout_s=120,
        on_undeliverable=lambda e, _: undeliverable.append(e),
        max_batch_size=16 * 1024,
    )
    async with pub:
        for partition in range(PARTITIONS):
            for conn in conns[partition]:
                await publish(pub, conn, Connected("10.0.0.1", "ua"))
        await pub.flush()

        await cluster.kill(1)  # the only replica of partition 0

        async def fill_partition_0() -> None:
            for i in range(5_000):  # ~100 bytes each: far more than one batch
                await publish(pub, conns[0][i % PER_PARTITION], Activity(1))

        filler = asyncio.create_task(fill_partition_0())
        try:
            # Wait until a call for partition 0 is held up: nothing handed in for a second.
            last, still_since = -1, 0.0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while True:
                count = sum(len(handed[c]) for c in conns[0])
                if count != last:
                    last, still_since = count, loop.time()
                elif loop.time() - still_since >= 1.0:
                    break
                assert not filler.done(), "partition 0 never held a call up"
                assert loop.time() < deadline
                await asyncio.sleep(0.05)
            acked_before = pub.stats().delivered

            async def other_partitions() -> None:
                for _ in range(25):
                    for partition in (1, 2):
                        for conn in conns[partition]:
                            await publish(pub, conn, Activity(1))

            # A generous bound: they take milliseconds; behind partition 0 they waited until
            # node 1 came back, which here is never before this returns.
            await asyncio.wait_for(other_partitions(), timeout=60)
            assert not filler.done(), "partition 0's call should still be waiting"
            others = 25 * 2 * PER_PARTITION
            # And the broker acknowledges them meanwhile (their leaders are up).
            while pub.stats().delivered < acked_before + others:
                assert loop.time() < deadline + 60, pub.stats()
                await asyncio.sleep(0.1)
            assert not filler.done()
        finally:
            await cluster.start(1)
        await asyncio.wait_for(filler, timeout=120)
        await pub.flush()

    assert undeliverable == []
    records = await read_all(cluster.bootstrap, topic, PARTITIONS)
    # Each connection's events are on the partition Kafka's default partitioner gives its id.
    assert all(r.partition == partition_of(r.key, PARTITIONS) for r in records)
    log = [decode(r.value, r.key) for r in records]
    ids = [e.event_id for e in log]
    assert len(ids) == len(set(ids)), "an event is in the log twice"
    total = sum(len(events) for events in handed.values())
    assert len(log) == total == pub.stats().delivered
    in_log: dict[str, list[Event]] = defaultdict(list)
    for e in log:
        in_log[e.connection_id].append(e)
    for conn, events in handed.items():
        assert in_log[conn] == events, f"{conn}: events out of order or missing"
