"""The projector as an operator runs it: `conntrack-projector` processes configured through
CONNTRACK_* variables, on the real broker, killed, restarted, doubled, and fed poison. Each test
runs once per read-model backend.

The oracle is conntrack.core.fold.fold over the events that were published: whatever
happened to the processes, the read model must equal it once the stored positions reach the
log end offsets.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.core.events import (
    Event,
)
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.projector import dead_letter
from tests.support.events import Record, as_records, make_events, poison_records
from tests.support.kafka import log_end_offsets, publish, publish_stream, read_dead_letters
from tests.support.ports import free_port
from tests.support.projector import (
    ProjectorProcess,
    assert_each_advance_exact,
    assert_matches_fold,
    scrape,
    stored,
    wait_caught_up,
    wait_for_log,
    wait_until,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def test_sigkill_mid_run_and_restart_ends_like_an_independent_fold(
    kafka_settings: Settings,
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    processes: list[ProjectorProcess],
) -> None:
    s = kafka_settings
    store = ProjectionStore(engine)
    rnd = random.Random(1)
    events = make_events(rnd, "k", 6000, 700)
    chunks = [events[i : i + 1500] for i in range(0, len(events), 1500)]
    topic = s.events_topic

    def start() -> ProjectorProcess:
        p = ProjectorProcess(s, database_url, tmp_path / f"p{len(processes)}.log")
        processes.append(p)
        return p

    await publish(s.kafka_bootstrap_servers, topic, as_records(chunks[0]))
    killed_behind_log_end = 0
    for chunk in chunks[1:]:
        p = start()
        await wait_for_log(p, "event=assigned")
        before = sum((await stored(store, topic)).values())
        # Events keep arriving while it applies, then it dies between or inside transactions.
        publishing = asyncio.create_task(
            publish_stream(s.kafka_bootstrap_servers, topic, as_records(chunk))
        )
        await wait_until(store, topic, lambda pos, b=before: sum(pos.values()) > b, 60, "progress")
        p.kill()
        at_kill = sum((await stored(store, topic)).values())
        await publishing
        ends = await log_end_offsets(s.kafka_bootstrap_servers, topic)
        killed_behind_log_end += at_kill < sum(ends.values())
    # How often the kill left work behind depends on timing: reported (pytest -rP), not asserted.
    print(f"{killed_behind_log_end} of {len(chunks) - 1} kills left work behind the log end")
    final = start()
    await wait_caught_up(store, s, within=90)
    await assert_matches_fold(store, events)
    assert await final.terminate() == 0
    assert_each_advance_exact(*(p.log() for p in processes))


async def test_duplicated_events_change_nothing(
    kafka_settings: Settings,
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    processes: list[ProjectorProcess],
) -> None:
    s = kafka_settings
    store = ProjectionStore(engine)
    events = make_events(random.Random(2), "d", 1500, 200)
    records = as_records(events)
    processes.append(p := ProjectorProcess(s, database_url, tmp_path / "p.log"))
    await publish(s.kafka_bootstrap_servers, s.events_topic, records)
    first = await wait_caught_up(store, s)
    assert sum(first.values()) == len(records)
    snapshot = await store.all_states()
    await assert_matches_fold(store, events)
    # The same records again (a gateway retrying a whole batch), shuffled: nothing changes.
    again = list(records)
    random.Random(3).shuffle(again)
    await publish(s.kafka_bootstrap_servers, s.events_topic, again)
    second = await wait_caught_up(store, s)
    assert sum(second.values()) == 2 * len(records)
    assert await store.all_states() == snapshot
    assert await p.terminate() == 0
    assert p.records_committed() == 2 * len(records)


async def test_poison_events_are_dead_lettered_with_provenance_and_counted(
    kafka_settings: Settings,
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    processes: list[ProjectorProcess],
) -> None:
    s = kafka_settings
    store = ProjectionStore(engine)
    port = free_port()
    processes.append(p := ProjectorProcess(s, database_url, tmp_path / "p.log", metrics_port=port))
    events = make_events(random.Random(4), "v", 600, 80)
    poison = poison_records()
    records: list[Record] = as_records(events)
    # Poison spread through the log, between valid events.
    for i, (record, _) in enumerate(poison):
        records.insert(i * 70 + 5, record)
    metas = await publish(s.kafka_bootstrap_servers, s.events_topic, records)
    ends = await wait_caught_up(store, s)
    await assert_matches_fold(store, events)

    # Every poison record is in the dead-letter topic, byte for byte, with its provenance.
    where = {
        (m.partition, m.offset): (rec, words)
        for m, (rec, words) in zip(
            [metas[records.index(r)] for r, _ in poison], poison, strict=True
        )
    }
    letters = await read_dead_letters(s.kafka_bootstrap_servers, s.dead_letter_topic, len(poison))
    assert len(letters) == len(poison)
    for letter in letters:
        headers = dict(letter.headers)
        assert headers[dead_letter.SOURCE_TOPIC] == s.events_topic.encode()
        origin = (
            int(headers[dead_letter.SOURCE_PARTITION]),
            int(headers[dead_letter.SOURCE_OFFSET]),
        )
        (key, value, _), words = where.pop(origin)
        assert (letter.key, letter.value) == (key, value)
        assert headers["trace-id"] == b"poison"
        assert words in headers[dead_letter.ERROR].decode()
        assert int(headers[dead_letter.SOURCE_TIMESTAMP]) > 0
    assert where == {}

    # The metrics endpoint counts them, next to the applied events by kind and the positions.
    metrics = await scrape(port)
    assert metrics[("conntrack_projector_events_dead_lettered_total", ())] == len(poison)
    kinds = Counter(e.kind for e in events)
    for kind, n in kinds.items():
        assert metrics[("conntrack_projector_events_applied_total", (("kind", kind),))] == n
    assert metrics[("conntrack_projector_batches_total", ())] >= 1
    assert metrics[("conntrack_projector_batch_seconds_count", ())] >= 1
    assert metrics[("conntrack_projector_assigned_partitions", ())] == 3
    assert metrics[("conntrack_projector_last_poll_timestamp_seconds", ())] > time.time() - 60
    # Freshness: how long after their append the batches' events became visible.
    assert metrics[("conntrack_projector_freshness_seconds_count", ())] >= 1
    assert (
        0
        < metrics[("conntrack_projector_freshness_seconds_sum", ())]
        < 60 * (metrics[("conntrack_projector_freshness_seconds_count", ())])
    )
    applied_at = metrics[("conntrack_projector_applied_append_timestamp_seconds", ())]
    assert max(m.timestamp for m in metas) / 1000 - 1 <= applied_at <= time.time()
    build = [k for k in metrics if k[0] == "conntrack_build_info"]
    assert len(build) == 1
    assert dict(build[0][1])["component"] == "projector"
    assert metrics[("process_resident_memory_bytes", ())] > 0
    assert ("python_gc_collections_total", (("generation", "0"),)) in metrics
    for partition, end in ends.items():
        labels = (("partition", str(partition)), ("topic", s.events_topic))
        assert metrics[("conntrack_projector_last_applied_offset", labels)] == end - 1
        assert metrics[("conntrack_projector_lag", labels)] == 0
    assert await p.terminate() == 0
    assert p.records_committed() == len(records)
    assert "event=dead_lettered" in p.log()


async def test_two_processes_in_one_group_end_like_one(
    kafka_settings: Settings,
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    processes: list[ProjectorProcess],
) -> None:
    s = kafka_settings
    store = ProjectionStore(engine)
    topic = s.events_topic
    pool = iter(make_events(random.Random(5), "g", 100_000, 2000))
    published: list[Event] = []

    async def feed(n: int) -> None:
        batch = [next(pool) for _ in range(n)]
        await publish(s.kafka_bootstrap_servers, topic, as_records(batch))
        published.extend(batch)

    async def feed_until(done: Any) -> None:
        """Keep the load on (100 events every 50 ms) until done() holds."""
        while not done():
            await feed(100)
            await asyncio.sleep(0.05)

    def start(name: str) -> ProjectorProcess:
        p = ProjectorProcess(s, database_url, tmp_path / f"{name}.log", batch_max_events=100)
        processes.append(p)
        return p

    first = start("first")
    await feed(1000)
    await wait_until(store, topic, lambda pos: sum(pos.values()) > 0, 60, "first progress")
    # A second process joins under load: the group rebalances while events keep arriving.
    second = start("second")
    await asyncio.wait_for(feed_until(lambda: "event=assigned" in second.log()), 60)
    await feed(1000)
    await wait_caught_up(store, s)
    assert "event=revoked" in first.log()  # it gave partitions to the second one
    # The first one leaves under load: its partitions move to the second.
    leaving = asyncio.create_task(first.terminate())
    await asyncio.wait_for(feed_until(leaving.done), 60)
    assert await leaving == 0
    await feed(500)
    await wait_caught_up(store, s, within=90)
    await assert_matches_fold(store, published)
    assert await second.terminate() == 0
    # Each record was committed by exactly one of them: nothing lost, nothing applied twice.
    assert first.records_committed() > 0
    assert second.records_committed() > 0
    assert first.records_committed() + second.records_committed() == len(published)
    assert_each_advance_exact(first.log(), second.log())


async def test_two_processes_killed_in_turn_end_like_the_fold(
    kafka_settings: Settings,
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    processes: list[ProjectorProcess],
) -> None:
    """Two members of one group, each SIGKILLed in turn and replaced while events (poison among
    them) keep arriving, so partitions move between processes that died mid-batch: the read
    model ends equal to the fold, every committed advance covered exactly the log's records in
    its range, and every poison record reached the dead-letter topic."""
    s = kafka_settings
    store = ProjectionStore(engine)
    topic = s.events_topic
    events = make_events(random.Random(21), "kl", 7200, 800)
    poison = [record for record, _ in poison_records()]
    records = as_records(events)
    for i, record in enumerate(poison):
        records.insert(i * 900 + 11, record)
    rnd = random.Random(22)

    def start() -> ProjectorProcess:
        p = ProjectorProcess(
            s, database_url, tmp_path / f"p{len(processes)}.log", batch_max_events=150
        )
        processes.append(p)
        return p

    members = [start(), start()]
    metas: list[Any] = []
    chunks = [records[i : i + 1200] for i in range(0, len(records), 1200)]
    for n, chunk in enumerate(chunks):
        for i in range(0, len(chunk), 100):  # in bursts, so the victim is busy when it dies
            metas += await publish(s.kafka_bootstrap_servers, topic, chunk[i : i + 100])
            await asyncio.sleep(0.03)
        await asyncio.sleep(rnd.uniform(0.0, 0.4))
        members[n % 2].kill()
        members[n % 2] = start()
    await wait_caught_up(store, s, within=120)
    await assert_matches_fold(store, events)
    for member in members:
        assert await member.terminate() == 0
    assert_each_advance_exact(*(p.log() for p in processes))
    # At least once in the dead-letter topic: a process killed after dead-lettering a record
    # but before committing its batch sends it again on replay.
    where = {(m.partition, m.offset) for m, r in zip(metas, records, strict=True) if r in poison}
    letters = await read_dead_letters(s.kafka_bootstrap_servers, s.dead_letter_topic, len(poison))
    origins = {
        (
            int(dict(letter.headers)[dead_letter.SOURCE_PARTITION]),
            int(dict(letter.headers)[dead_letter.SOURCE_OFFSET]),
        )
        for letter in letters
    }
    assert origins == where


async def test_sigterm_finishes_the_batch_commits_and_exits_zero(
    kafka_settings: Settings,
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    processes: list[ProjectorProcess],
) -> None:
    s = kafka_settings
    store = ProjectionStore(engine)
    topic = s.events_topic
    events = make_events(random.Random(6), "t", 4000, 500)
    processes.append(
        p := ProjectorProcess(s, database_url, tmp_path / "p.log", batch_max_events=50)
    )
    publishing = asyncio.create_task(publish(s.kafka_bootstrap_servers, topic, as_records(events)))
    await wait_until(store, topic, lambda pos: sum(pos.values()) > 500, 60, "progress")
    assert await p.terminate() == 0
    await publishing
    log = p.log()
    assert "stopped cleanly" in log
    # What it says it committed is exactly what the database holds: no half batch.
    assert sum((await stored(store, topic)).values()) == p.records_committed()
    processes.append(again := ProjectorProcess(s, database_url, tmp_path / "p2.log"))
    await wait_caught_up(store, s)
    await assert_matches_fold(store, events)
    assert await again.terminate() == 0
    assert p.records_committed() + again.records_committed() == len(events)
