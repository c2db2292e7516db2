"""conntrack-producer as an operator runs it: topics, then simulate, against the real broker."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator

import pytest

from conntrack.core.settings import Settings
from conntrack.producer.simulator import Workload, generate
from tests.support.kafka import create_raw, delete_topics, read_events, unique

pytestmark = [pytest.mark.kafka]


async def run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conntrack.producer",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def topic_env(kafka_bootstrap: str) -> AsyncIterator[dict[str, str]]:
    events, dlq = unique("cli-events"), unique("cli-dlq")
    commands, outcomes = unique("cli-commands"), unique("cli-outcomes")
    lifecycle, state = unique("cli-lifecycle"), unique("cli-lifecycle-state")
    yield {
        "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CONNTRACK_EVENTS_TOPIC": events,
        "CONNTRACK_DEAD_LETTER_TOPIC": dlq,
        "CONNTRACK_COMMANDS_TOPIC": commands,
        "CONNTRACK_COMMAND_OUTCOMES_TOPIC": outcomes,
        "CONNTRACK_LIFECYCLE_TOPIC": lifecycle,
        "CONNTRACK_LIFECYCLE_STATE_TOPIC": state,
    }
    await delete_topics(kafka_bootstrap, [events, dlq, commands, outcomes, lifecycle, state])


async def test_topics_command_creates_then_reports_and_refuses_a_history_losing_topic(
    kafka_bootstrap: str, topic_env: dict[str, str]
) -> None:
    events, dlq = topic_env["CONNTRACK_EVENTS_TOPIC"], topic_env["CONNTRACK_DEAD_LETTER_TOPIC"]
    commands = topic_env["CONNTRACK_COMMANDS_TOPIC"]
    outcomes = topic_env["CONNTRACK_COMMAND_OUTCOMES_TOPIC"]
    lifecycle = topic_env["CONNTRACK_LIFECYCLE_TOPIC"]
    state = topic_env["CONNTRACK_LIFECYCLE_STATE_TOPIC"]
    code, out, err = await run(topic_env, "topics", "--partitions", "3")
    assert (code, err) == (0, "")
    # One broker: one replica (the default follows the cluster), the events topic stamped by
    # the log, no unclean leader election anywhere.
    assert out.splitlines() == [
        f"{events}: created, 3 partitions, replication factor 1, cleanup.policy=delete, "
        "retention.ms=-1, retention.bytes=-1, min.insync.replicas=1, "
        "message.timestamp.type=LogAppendTime, unclean.leader.election.enable=false; "
        "keeps history",
        f"{dlq}: created, 3 partitions, replication factor 1, cleanup.policy=delete, "
        "retention.ms=-1, retention.bytes=-1, min.insync.replicas=1, "
        "message.timestamp.type=CreateTime, unclean.leader.election.enable=false; keeps history",
    ] + [
        f"{name}: created, 3 partitions, replication factor 1, cleanup.policy=delete, "
        "retention.ms=86400000, retention.bytes=-1, min.insync.replicas=1, "
        "message.timestamp.type=CreateTime, unclean.leader.election.enable=false; transient"
        for name in (commands, outcomes)
    ] + [
        # The lifecycle stream keeps history like the events; its state topic is compacted.
        f"{lifecycle}: created, 3 partitions, replication factor 1, cleanup.policy=delete, "
        "retention.ms=-1, retention.bytes=-1, min.insync.replicas=1, "
        "message.timestamp.type=CreateTime, unclean.leader.election.enable=false; keeps history",
        f"{state}: created, 3 partitions, replication factor 1, cleanup.policy=compact, "
        "retention.ms=-1, retention.bytes=-1, min.insync.replicas=1, "
        "message.timestamp.type=CreateTime, unclean.leader.election.enable=false; "
        "compacted state",
    ]
    code, out, _ = await run(topic_env, "topics", "--partitions", "3")
    assert code == 0
    assert [line.split(",")[0] for line in out.splitlines()] == [
        f"{events}: exists",
        f"{dlq}: exists",
        f"{commands}: exists",
        f"{outcomes}: exists",
        f"{lifecycle}: exists",
        f"{state}: exists",
    ]

    short_lived = unique("cli-short")
    await create_raw(kafka_bootstrap, short_lived, {"retention.ms": "1000"})
    try:
        code, out, err = await run(
            {**topic_env, "CONNTRACK_EVENTS_TOPIC": short_lived}, "topics", "--partitions", "2"
        )
    finally:
        await delete_topics(kafka_bootstrap, [short_lived])
    assert code == 1
    assert "REFUSED" in out
    assert f"topic {short_lived} would lose history: retention.ms=1000" in err

    code, _, err = await run(
        topic_env, "topics", "--replication-factor", "1", "--min-insync-replicas", "2"
    )
    assert code == 2
    assert "min.insync.replicas" in err


async def test_simulate_publishes_the_seeded_workload_and_names_an_open_connection(
    topic_env: dict[str, str],
) -> None:
    assert (await run(topic_env, "topics", "--partitions", "3"))[0] == 0
    code, out, err = await run(
        topic_env, "simulate", "--connections", "50", "--seed", "3", "--progress-interval", "0.001"
    )
    assert code == 0, err
    published = re.search(r"published (\d+) events for 50 connections", out)
    open_line = re.search(r"^an open connection: (\S+)$", out, re.MULTILINE)
    assert published
    assert open_line
    assert "simulate:" in err  # the progress line

    settings = Settings(
        kafka_bootstrap_servers=topic_env["CONNTRACK_KAFKA_BOOTSTRAP_SERVERS"],
        events_topic=topic_env["CONNTRACK_EVENTS_TOPIC"],
    )
    got = await read_events(settings.kafka_bootstrap_servers, settings.events_topic)
    assert len(got) == int(published.group(1))
    # Reproducible: the same seed gives the same events (ids included) at any start time.
    expected = list(generate(Workload(connections=50, seed=3)))
    assert sorted(e.event_id for e in got) == sorted(e.event_id for e in expected)
    kinds = [e.kind for e in got if e.connection_id == open_line.group(1)]
    assert kinds[0] == "connected"
    assert "disconnected" not in kinds


async def test_simulate_without_a_broker_fails_clearly() -> None:
    code, out, err = await run(
        {"CONNTRACK_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"},
        "simulate",
        "--connections",
        "5",
        "--delivery-timeout",
        "1",
    )
    assert code == 69  # a dependency that could not be reached (core/cli.py)
    assert "error: cannot reach Kafka at 127.0.0.1:1" in err
    assert "an open connection" not in out


async def test_topics_refuses_a_config_that_can_lose_acknowledged_records(
    kafka_bootstrap: str,
) -> None:
    code, out, err = await run(
        {
            "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "CONNTRACK_EVENTS_TOPIC": unique("never-created"),
        },
        "topics",
        "--config",
        "unclean.leader.election.enable=true",
    )
    assert code == 2
    assert out == ""
    assert "unclean.leader.election.enable=true can lose acknowledged records" in err
    assert "Traceback" not in err
