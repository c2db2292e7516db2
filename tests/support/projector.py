"""Running projectors (in-process and as `conntrack-projector` processes) and checking what
they did against the fold of the log."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from conntrack.core.events import (
    Event,
)
from conntrack.core.fold import fold
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.projector.runner import Projector
from tests.support.kafka import log_end_offsets

PROJECTOR = Path(sys.executable).parent / "conntrack-projector"


# The broker's group.min.session.timeout.ms: a killed member's partitions move on after this.
SESSION_TIMEOUT_MS = 6000


async def stored(store: ProjectionStore, topic: str) -> dict[int, int]:
    return {p: o for (t, p), o in (await store.all_positions()).items() if t == topic}


async def wait_until(
    store: ProjectionStore, topic: str, predicate: Any, within: float, what: str
) -> dict[int, int]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        positions = await stored(store, topic)
        if predicate(positions):
            return positions
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; stored positions {positions}")
        await asyncio.sleep(0.02)


async def wait_caught_up(
    store: ProjectionStore, settings: Settings, within: float = 60
) -> dict[int, int]:
    ends = await log_end_offsets(settings.kafka_bootstrap_servers, settings.events_topic)
    return await wait_until(
        store,
        settings.events_topic,
        lambda positions: positions == ends,
        within,
        f"the log end offsets {ends}",
    )


class ProjectorProcess:
    """One `conntrack-projector` subprocess; its log goes to a file the test can read."""

    def __init__(
        self, settings: Settings, database_url: str, log_path: Path, **extra: object
    ) -> None:
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")}
        values: dict[str, object] = {
            "kafka_bootstrap_servers": settings.kafka_bootstrap_servers,
            "events_topic": settings.events_topic,
            "dead_letter_topic": settings.dead_letter_topic,
            "consumer_group": settings.consumer_group,
            "database_url": database_url,
            "batch_max_events": 200,
            "batch_max_wait_ms": 20,
            "consumer_session_timeout_ms": SESSION_TIMEOUT_MS,
            "retry_max_backoff_seconds": 1,
            # Each committed batch is logged with its ranges (assert_each_advance_exact).
            "log_level": "DEBUG",
            **extra,
        }
        env.update({f"CONNTRACK_{k.upper()}": str(v) for k, v in values.items()})
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [str(PROJECTOR)], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._log.close()

    async def terminate(self, within: float = 60) -> int:
        """SIGTERM and wait for the exit status."""
        self.process.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(self.process.wait, within)
        self._log.close()
        return rc

    def records_committed(self) -> int:
        found = re.findall(r"event=stopped records_committed=(\d+)", self.log())
        assert len(found) == 1, self.log()
        return int(found[0])

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self._log.close()


_ADVANCE = re.compile(r"(\d+):(\d+)-(\d+)/(\d+)")


def assert_each_advance_exact(*logs: str) -> int:
    """Every batch a projector logged as committed moved each partition from p to q having
    applied q - p records: all the log holds in [p, q) (test topics hold no transaction markers
    or compacted offsets, so every offset is a record). This is the invariant exactly-once rests
    on; an end state equal to the fold can hide a breach that later duplicates papered over.
    Returns how many advances were checked."""
    checked = 0
    for text in logs:
        for line in text.splitlines():
            if "event=batch_applied" not in line:
                continue
            for partition, start, end, applied in _ADVANCE.findall(line.rsplit("offsets=")[1]):
                assert int(end) - int(start) == int(applied), f"partition {partition}: {line}"
                checked += 1
    assert checked > 0, "no committed batch was logged"
    return checked


async def assert_matches_fold(store: ProjectionStore, events: Sequence[Event]) -> None:
    states = await store.all_states()
    expected = fold(events)
    assert set(states) == set(expected)
    assert states == expected


async def wait_for_log(
    process: ProjectorProcess, text: str, within: float = 60, more_than: int = 0
) -> None:
    """Wait until the process has logged `text` more than `more_than` times."""
    deadline = asyncio.get_running_loop().time() + within
    while process.log().count(text) <= more_than:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{text!r} never appeared in the log:\n{process.log()}")
        await asyncio.sleep(0.05)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    out = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def fenced(projector: Projector) -> float:
    value = projector.metrics.registry.get_sample_value("conntrack_projector_fenced_batches_total")
    assert value is not None
    return value


def per_partition(projector: Projector, metric: str, topic: str) -> float:
    """A per-partition counter summed over the test topics' three partitions."""
    registry = projector.metrics.registry
    return sum(
        registry.get_sample_value(metric, {"topic": topic, "partition": str(p)}) or 0.0
        for p in range(3)
    )


@contextlib.asynccontextmanager
async def running(projector: Projector) -> AsyncIterator[Projector]:
    async with projector:
        task = asyncio.create_task(projector.run())
        try:
            yield projector
        finally:
            await projector.stop()
            await asyncio.wait_for(task, 30)


async def settled_count(projector: Projector, expected: int, within: float = 10.0) -> int:
    """records_committed once it stops trailing the database: the stored positions (what
    wait_caught_up polls) commit a moment before the batch's records are counted, so wait until
    the count reaches `expected` (or the time is up); an overshoot is returned at once."""
    for _ in range(int(within / 0.05)):
        if projector.records_committed >= expected:
            break
        await asyncio.sleep(0.05)
    return projector.records_committed
