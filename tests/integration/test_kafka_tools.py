"""Kafka's own operator tools, run from the same artifacts as the broker (infra/kafka.sh tool):
lag and topics checked the way operators know, against the projector's group."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.projector.runner import Projector
from tests.support.events import as_records, make_events
from tests.support.kafka import publish
from tests.support.projector import running, wait_caught_up

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

KAFKA_SH = Path(__file__).resolve().parents[2] / "infra" / "kafka.sh"


def tool(bootstrap: str, *args: str) -> str:
    port = bootstrap.rsplit(":", 1)[1]
    done = subprocess.run(
        ["bash", str(KAFKA_SH), "tool", *args],
        env={**os.environ, "CONNTRACK_KAFKA_PORT": port},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_consumer_group_lag_and_topics_with_kafkas_own_tools(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    s = kafka_settings
    store = ProjectionStore(engine)
    events = make_events(random.Random(41), "kt", 600, 60)
    async with running(Projector(s, store)):
        await publish(s.kafka_bootstrap_servers, s.events_topic, as_records(events))
        ends = await wait_caught_up(store, s)
        # Group offsets follow the database in the background (lag tools only read them).
        for _ in range(100):
            out = await asyncio.to_thread(
                tool,
                s.kafka_bootstrap_servers,
                "kafka-consumer-groups",
                "--describe",
                "--group",
                s.consumer_group,
            )
            rows = [line.split() for line in out.splitlines() if s.events_topic in line]
            offsets = {int(r[2]): (r[3], r[4]) for r in rows}
            if offsets == {p: (str(e), str(e)) for p, e in ends.items()}:
                break
            await asyncio.sleep(0.2)
        assert offsets == {p: (str(e), str(e)) for p, e in ends.items()}, out
    described = tool(
        s.kafka_bootstrap_servers, "kafka-topics", "--describe", "--topic", s.events_topic
    )
    assert f"Topic: {s.events_topic}" in described
    assert "PartitionCount: 3" in described
