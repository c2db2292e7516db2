"""System test on a private three-broker KRaft cluster (infra/kafka.sh cluster): a Publisher
streams connection events and a Projector folds them into PostgreSQL while one node dies by
SIGKILL (the leader of a busy partition; then the active controller) and comes back.

At the end: nothing the publisher saw acknowledged is missing, the read model is the fold of
the log (and `verify` agrees), the log holds no event twice (the idempotent producer's retries
to the new leader were deduplicated), and the projector applied each record exactly once.

The stalls (how long no acknowledgement, and no projector commit, came after the kill) are
printed (pytest -s); they are measured, not asserted: speed belongs to the benchmarks."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.audit.log import LogReader
from conntrack.audit.replay import verify
from conntrack.core.events import Event
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.producer.errors import UndeliveredEventsError
from conntrack.producer.publisher import Publisher
from conntrack.projector.runner import Projector
from tests.support.cluster import KAFKA_SH, Cluster
from tests.support.events import make_events
from tests.support.kafka import log_end_offsets, read_events, unique
from tests.support.projector import (
    assert_matches_fold,
    running,
    settled_count,
    wait_caught_up,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow, pytest.mark.cluster]

PARTITIONS = 3
RATE_PER_S = 200  # a steady stream, well below what one node takes
TICK_S = 0.05


async def provision(cluster: Cluster, settings: Settings) -> dict[str, dict[str, object]]:
    """The topics, as an operator provisions them: `conntrack-producer topics`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")}
    env.update(
        CONNTRACK_KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        CONNTRACK_EVENTS_TOPIC=settings.events_topic,
        CONNTRACK_DEAD_LETTER_TOPIC=settings.dead_letter_topic,
        CONNTRACK_COMMANDS_TOPIC=unique("commands"),
        CONNTRACK_COMMAND_OUTCOMES_TOPIC=unique("outcomes"),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conntrack.producer",
        "topics",
        "--partitions",
        str(PARTITIONS),
        "--format",
        "json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    reports = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    return {str(r["name"]): r for r in reports}


@pytest.fixture
async def cluster_settings(cluster: Cluster) -> Settings:
    await cluster.up()
    settings = Settings(
        kafka_bootstrap_servers=cluster.bootstrap,
        events_topic=unique("events"),
        dead_letter_topic=unique("dlq"),
        consumer_group=unique("group"),
        batch_max_events=200,
        batch_max_wait_ms=50,
        retry_max_backoff_seconds=1,
        consumer_session_timeout_ms=6000,
    )
    reports = await provision(cluster, settings)
    # The project's default replication on three brokers: three replicas, two in sync for an
    # acks=all write, no unclean election.
    for topic in (settings.events_topic, settings.dead_letter_topic):
        report = reports[topic]
        assert report["replication_factor"] == 3, report
        configs = report["configs"]
        assert isinstance(configs, dict)
        assert configs["min.insync.replicas"] == "2", report
        assert configs["unclean.leader.election.enable"] == "false", report
    described = await cluster.describe([settings.events_topic])
    assert [len(p["replicas"]) for p in described[settings.events_topic]] == [3] * PARTITIONS
    return settings


@dataclass
class Run:
    """What one run saw: the events handed in, those reported undeliverable, samples of the
    publisher's and projector's progress over time, and the moments of the kill and restart."""

    handed: list[Event] = field(default_factory=list)
    undeliverable: dict[str, BaseException] = field(default_factory=dict)
    # (t, events handed in, acknowledged, projector's records committed)
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    longest_publish_s: float = 0.0  # the longest a publish() call took (it may wait)
    killed_at: float = 0.0
    restarted_at: float = 0.0
    victim: int = 0
    coordinator: int = 0  # of the projector's group, before the kill
    closing_error: BaseException | None = None

    def gave_up(self, event: Event, error: BaseException) -> None:
        self.undeliverable[event.event_id] = error

    def stall(self, column: int, since: float, until: float) -> float:
        """The longest time from `since` to `until` in which the column did not move."""
        longest, last_change, last_value = 0.0, since, None
        for sample in self.samples:
            t, value = sample[0], sample[column]
            if t < since or t > until:
                continue
            if last_value is not None and value != last_value:
                longest = max(longest, t - last_change)
                last_change = t
            last_value = value
        return max(longest, until - last_change) if last_value is not None else until - since

    def first_progress_after(self, column: int, since: float) -> float | None:
        before = [s[column] for s in self.samples if s[0] <= since]
        floor = before[-1] if before else 0
        return next((s[0] for s in self.samples if s[0] > since and s[column] > floor), None)


async def run_through_a_kill(
    cluster: Cluster,
    settings: Settings,
    engine: AsyncEngine,
    choose_victim: Callable[[], Awaitable[int]],
    while_down: Callable[[int], Awaitable[None]],
    prefix: str,
) -> Run:
    """Stream, kill the node choose_victim() names, wait until both sides move again, call
    while_down(victim), restart the node, stream a little more, then check everything."""
    await cluster.wait_fully_replicated()
    loop = asyncio.get_running_loop()
    run = Run()
    events = make_events(random.Random(prefix), prefix, 60_000, 600)
    store = ProjectionStore(engine)
    stop_stream = asyncio.Event()
    publisher = Publisher(
        settings.kafka_bootstrap_servers,
        settings.events_topic,
        "cluster-test",
        activity_interval_s=0,
        on_undeliverable=run.gave_up,
    )

    async def stream() -> None:
        per_tick = int(RATE_PER_S * TICK_S)
        next_at = loop.time()
        while not stop_stream.is_set():
            for _ in range(per_tick):
                event = events[len(run.handed)]
                began = loop.time()
                await publisher.publish(event)
                run.longest_publish_s = max(run.longest_publish_s, loop.time() - began)
                run.handed.append(event)
            next_at += TICK_S
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async with running(Projector(settings, store)) as projector:

        async def sample() -> None:
            while True:
                run.samples.append(
                    (
                        loop.time(),
                        len(run.handed),
                        publisher.stats().delivered,
                        projector.records_committed,
                    )
                )
                await asyncio.sleep(0.05)

        await publisher.start()
        sampler = asyncio.create_task(sample())
        streamer = asyncio.create_task(stream())
        try:
            await asyncio.sleep(4)  # steady state first
            assert publisher.stats().delivered > 0
            assert projector.records_committed > 0
            run.coordinator = await cluster.coordinator(settings.consumer_group)
            run.victim = await choose_victim()
            run.killed_at = loop.time()
            await cluster.kill(run.victim)
            # Wait until both sides move again, or give up: a stall past this is a hang.
            acked_at_kill = publisher.stats().delivered
            committed_at_kill = projector.records_committed
            deadline = loop.time() + 90
            while (
                publisher.stats().delivered < acked_at_kill + RATE_PER_S
                or projector.records_committed < committed_at_kill + RATE_PER_S
            ):
                assert not streamer.done(), streamer
                assert loop.time() < deadline, (
                    f"no recovery 90 s after node {run.victim} was killed: {publisher.stats()}, "
                    f"{projector.records_committed} records committed"
                )
                await asyncio.sleep(0.1)
            await while_down(run.victim)
            run.restarted_at = loop.time()
            await cluster.start(run.victim)
            await asyncio.sleep(2)  # the restarted node fetches while the stream goes on
        finally:
            stop_stream.set()
            await streamer
            try:
                await publisher.stop()
            except UndeliveredEventsError as exc:
                run.closing_error = exc
            await wait_caught_up(store, settings, within=120)
            sampler.cancel()
        log = await read_events(settings.kafka_bootstrap_servers, settings.events_topic)
        committed = await settled_count(projector, len(log))

    report(run, prefix, len(log))
    # Every acknowledged event is in the log, once (the idempotent producer's retries to the
    # new leader were deduplicated), and nothing else is.
    ids = [e.event_id for e in log]
    assert len(ids) == len(set(ids)), "an event is in the log twice"
    acknowledged = {e.event_id for e in run.handed} - run.undeliverable.keys()
    assert acknowledged <= set(ids), f"{len(acknowledged - set(ids))} acknowledged events lost"
    assert set(ids) <= {e.event_id for e in run.handed}
    # The read model is the fold of the log, each record applied exactly once.
    assert committed == len(log)
    assert await stored_positions(store, settings) == await log_end_offsets(
        settings.kafka_bootstrap_servers, settings.events_topic
    )
    await assert_matches_fold(store, log)
    async with LogReader(settings.kafka_bootstrap_servers, settings.events_topic) as reader:
        verification = await verify(engine, reader)
    assert verification.ok, verification.differences[:5]
    assert verification.events == len(log)
    # And every event handed in was acknowledged: one node of three may die (two replicas stay
    # in sync) without the publisher giving up on anything.
    assert not run.undeliverable, f"{len(run.undeliverable)} undeliverable: {run.closing_error!r}"
    assert run.closing_error is None
    assert publisher.stats().delivered == len(run.handed)
    return run


async def stored_positions(store: ProjectionStore, settings: Settings) -> dict[int, int]:
    return {
        p: o for (t, p), o in (await store.all_positions()).items() if t == settings.events_topic
    }


def report(run: Run, what: str, records: int) -> None:
    t0, t1, end = run.killed_at, run.restarted_at, run.samples[-1][0]

    def first(column: int) -> str:
        at = run.first_progress_after(column, t0)
        return "-" if at is None else f"{at - t0:.1f} s"

    def stalls(since: float, until: float) -> str:
        return ", ".join(
            f"{name} {run.stall(column, since, until):.1f} s"
            for name, column in (("handing in", 1), ("acks", 2), ("projector", 3))
        )

    print(
        f"\n[{what}] node {run.victim} killed at {RATE_PER_S} events/s; {records} events in all; "
        f"the projector's group coordinator was node {run.coordinator}"
        f"\n  first after the kill: ack {first(2)}, projector commit {first(3)}"
        f"\n  longest stall kill..restart ({t1 - t0:.1f} s): {stalls(t0, t1)}"
        f"\n  longest stall restart..end ({end - t1:.1f} s): {stalls(t1, end)}"
        f"\n  longest publish() call: {run.longest_publish_s:.1f} s"
    )


@pytest.mark.parametrize("backend", ["postgres"])
async def test_killing_the_leader_of_a_busy_partition_loses_and_doubles_nothing(
    cluster: Cluster, cluster_settings: Settings, engine: AsyncEngine
) -> None:
    topic = cluster_settings.events_topic
    busiest = -1

    async def busiest_partitions_leader() -> int:
        nonlocal busiest
        ends = await log_end_offsets(cluster_settings.kafka_bootstrap_servers, topic)
        busiest = max(ends, key=lambda p: ends[p])
        return await cluster.leader(topic, busiest)

    async def moved(victim: int) -> None:
        assert await cluster.leader(topic, busiest) not in (victim, -1)

    await run_through_a_kill(
        cluster, cluster_settings, engine, busiest_partitions_leader, moved, "lead"
    )


@pytest.mark.parametrize("backend", ["postgres"])
async def test_killing_the_active_controller_loses_and_doubles_nothing(
    cluster: Cluster, cluster_settings: Settings, engine: AsyncEngine
) -> None:
    async def new_controller(victim: int) -> None:
        assert await cluster.controller() != victim

    await run_through_a_kill(
        cluster, cluster_settings, engine, cluster.controller, new_controller, "ctrl"
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["kill", "7"], 1, "infra/kafka: cluster: node must be one of 1..3, not '7'"),
        (["start", "x"], 1, "infra/kafka: cluster: node must be one of 1..3, not 'x'"),
        (["leader"], 1, "infra/kafka: cluster: usage: cluster leader TOPIC PARTITION"),
        (["up", "0"], 1, "infra/kafka: cluster: size must be 1..9, not '0'"),
        (["controller"], 1, "infra/kafka: cluster: no node is running"),
        (["status"], 3, "infra/kafka: no cluster"),
        (["frobnicate"], 2, "usage: infra/kafka.sh cluster up [N]|down|status|kill I|start I|"),
    ],
)
def test_cluster_commands_answer_bad_input_with_one_line(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    cluster = Cluster.create(tmp_path, 3)  # nothing formatted: each fails before a node starts
    done = subprocess.run(
        [str(KAFKA_SH), "cluster", *args],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == code, output
    assert len(output.splitlines()) == 1, output
    assert output.startswith(message), output
