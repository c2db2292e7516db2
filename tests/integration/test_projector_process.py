"""The projector as an operator runs it: `conntrack-projector` processes configured through
CONNTRACK_* variables, on the real broker, killed, restarted, doubled, and fed poison. Each test
runs once per read-model backend.

The oracle is connection_tracker.fold.fold over the events that were published: whatever
happened to the processes, the read model must equal it once the stored positions reach the
log end offsets.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from connection_tracker.events import (
    HEADERS,
    Activity,
    Connected,
    Disconnected,
    Event,
    encode,
)
from connection_tracker.fold import fold
from connection_tracker.settings import Settings
from connection_tracker.store import ProjectionStore
from projector import dead_letter

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PROJECTOR = Path(sys.executable).parent / "conntrack-projector"
T0 = 1_764_300_000_000_000_000
# The broker's group.min.session.timeout.ms: a killed member's partitions move on after this.
SESSION_TIMEOUT_MS = 6000

Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers


def make_events(rnd: random.Random, prefix: str, n: int, connections: int) -> list[Event]:
    """n events over `connections` connections, each connection's in a plausible order."""
    out = []
    for i in range(n):
        cid = f"{prefix}-{rnd.randrange(connections)}"
        at = T0 + rnd.randrange(10**12)
        roll = rnd.random()
        payload = (
            Connected(f"10.{rnd.randrange(256)}.0.1", f"ua/{rnd.randrange(3)}")
            if roll < 0.3
            else Disconnected(rnd.choice([1000, 1001]), "bye")
            if roll < 0.4
            else Activity(rnd.randrange(9))
        )
        out.append(Event(f"{prefix}-e{i}", cid, f"gw-{rnd.randrange(3)}", at, payload))
    return out


def as_records(events: Sequence[Event]) -> list[Record]:
    return [(e.connection_id.encode(), encode(e), list(HEADERS)) for e in events]


async def publish(bootstrap: str, topic: str, records: Sequence[Record]) -> list[Any]:
    """Publish and wait until the broker has all of them; returns their RecordMetadata."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v, headers=h) for k, v, h in records]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


async def _partitions(bootstrap: str, topic: str) -> list[int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (description,) = await admin.describe_topics([topic])
        return [int(p["partition"]) for p in description["partitions"]]
    finally:
        await admin.close()


async def log_end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    # aiokafka's group-less consumer raises CancelledError from stop() if its background task
    # has not run once yet; let it.
    await asyncio.sleep(0.01)
    try:
        partitions = await _partitions(bootstrap, topic)
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: int(o) for tp, o in ends.items()}
    finally:
        await consumer.stop()


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@pytest.fixture
def processes() -> Any:
    started: list[ProjectorProcess] = []
    yield started
    for p in started:
        p.close()


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


async def publish_stream(
    bootstrap: str, topic: str, records: Sequence[Record], bursts: int = 30, pause: float = 0.05
) -> None:
    """Publish in bursts with pauses, so a projector is still busy when a test kills it."""
    step = max(1, len(records) // bursts)
    for i in range(0, len(records), step):
        await publish(bootstrap, topic, records[i : i + step])
        await asyncio.sleep(pause)


async def wait_for_log(
    process: ProjectorProcess, text: str, within: float = 60, more_than: int = 0
) -> None:
    """Wait until the process has logged `text` more than `more_than` times."""
    deadline = asyncio.get_running_loop().time() + within
    while process.log().count(text) <= more_than:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{text!r} never appeared in the log:\n{process.log()}")
        await asyncio.sleep(0.05)


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


def _poison_message(**changes: Any) -> bytes:
    from connection_tracker.protogen.conntrack.events.v1 import events_pb2 as pb
    from connection_tracker.timeutil import to_timestamp

    msg = pb.ConnectionEvent(
        schema_version=1,
        event_id="poison-e",
        connection_id="p",
        gateway_id="gw",
        occurred_at=to_timestamp(T0),
    )
    msg.activity.frames = 1
    for name, value in changes.items():
        if name == "occurred_at":
            msg.occurred_at.CopyFrom(value)
        elif name == "kind":
            msg.ClearField("activity")
            return msg.SerializeToString() + bytes([13 << 3 | 2, 0])  # an unknown field 13
        else:
            setattr(msg, name, value)
    return msg.SerializeToString()


def poison_records() -> list[tuple[Record, str]]:
    """(record, words of the error it must be dead-lettered with)."""
    from connection_tracker.timeutil import to_timestamp

    trace = [("trace-id", b"poison")]
    valid = encode(Event("valid-e", "p", "gw", T0, Activity(1)))
    return [
        ((b"p", b"\x00\xffnot protobuf at all\xff", trace), "not a ConnectionEvent"),
        ((b"p", _poison_message(event_id=""), trace), "event_id is missing"),
        ((b"p", _poison_message(kind=None), trace), "kind is missing or unknown"),
        ((b"p", _poison_message(occurred_at=to_timestamp(0)), trace), "outside"),
        ((b"someone-else", valid, trace), "key does not equal"),
        ((None, valid, trace), "record has no key"),
        ((b"p", None, trace), "no value"),
        ((b"p", _poison_message(gateway_id="g\x00w"), trace), "NUL"),
    ]


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    out = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def read_dead_letters(bootstrap: str, topic: str, n: int) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(30):
            while len(out) < n:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    out.extend(records)
        # Nothing beyond the n expected.
        extra = await consumer.getmany(timeout_ms=1000)
        out.extend(r for records in extra.values() for r in records)
    finally:
        await consumer.stop()
    return out


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
