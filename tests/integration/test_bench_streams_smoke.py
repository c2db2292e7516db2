"""The Kafka Streams peer of the benchmark (bench/kafka-streams/, BENCHMARKS.md "Kafka Streams
peer") builds, runs on the real broker and folds by fold.py's rules: on a topic of about 1,000
records full of what the rules must decide (ties on time and id broken by contents, characters
beyond the BMP, duplicates, a Disconnected before its Connected, node events, poison records),
its store equals fold_tuples() of the same topic for every connection. Its speed is not
checked here (python -m bench run --only streams-peer-activity measures it)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from bench.scenarios.streams_peer import (
    PeerUnavailable,
    build,
    differences,
    python_fold,
    read_dump,
    run_peer,
)
from conntrack.core.events import (
    HEADERS,
    Activity,
    Connected,
    Disconnected,
    Event,
    NodeHeartbeat,
    NodeStarted,
    encode,
    record_key,
)
from tests.support.events import T0, Record, as_records, make_events, poison_records
from tests.support.kafka import create_topic, delete_topics, publish, unique

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.slow,
    # A first build on a fresh machine downloads Kafka Streams, RocksDB and protoc with Maven.
    pytest.mark.timeout(1200),
]


def _tricky_events() -> list[Event]:
    """What a port of the rules gets wrong first."""
    out: list[Event] = []
    # Two Connected sharing (time, id): the contents decide, by code point (U+FFFF sorts before
    # U+1F600 in Python; Java's String.compareTo, by UTF-16 unit, would say the opposite).
    for ua in ("ua-\U0001f600", "ua-\uffff"):
        out.append(Event("tie-c", "tie", "gw-a", T0 + 5, Connected("10.0.0.1", ua, "node-a", 7)))
    # Two Disconnected sharing (time, id): the status code, then the reason decides.
    for code, reason in ((1001, "b"), (1000, "z"), (1000, "a")):
        out.append(Event("tie-d", "tie", "gw-a", T0 + 9, Disconnected(code, reason)))
    # Disconnected earlier than the Connected, activity later than both, a duplicate of each.
    late = [
        Event("l-d", "late", "gw-b", T0 + 100, Disconnected(0, "")),
        Event("l-c", "late", "gw-b", T0 + 200, Connected("", "")),
        Event("l-a", "late", "gw-b", T0 + 300, Activity(0)),
    ]
    out += late + late
    # Only activity: a state with no Connected.
    out.append(Event("o-a", "only-activity", "gw-c", T0 + 1, Activity(3)))
    # A connection with a node role, then the node's own events (never a connection's state).
    out.append(Event("n-c", "on-node", "gw-c", T0 + 2, Connected("::1", "ua", "node-x", 2)))
    out.append(Event("n-s", "", "gw-c", T0 + 3, NodeStarted("node-x", 3)))
    out.append(Event("n-h", "", "gw-c", T0 + 4, NodeHeartbeat("node-x", 3)))
    return out


def _records() -> list[Record]:
    rnd = random.Random(19)
    events = make_events(rnd, "peer", 900, 80) + _tricky_events()
    records: list[Record] = [(record_key(e), encode(e), list(HEADERS)) for e in events]
    records += as_records(rnd.sample(events, 50))  # redelivered duplicates
    records += [record for record, _ in poison_records()]
    rnd.shuffle(records)  # any order across connections; the fold must not care
    return records


async def test_peer_folds_like_fold_py(kafka_bootstrap: str, tmp_path: Path) -> None:
    missing = [tool for tool in ("java", "javac", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the Kafka Streams peer needs a Java 17 JDK and Maven ({missing} not found)")
    try:
        classpath = build()
    except PeerUnavailable as exc:
        pytest.fail(f"the Kafka Streams peer did not build: {exc}")
    topic = unique("streams-peer")
    await create_topic(kafka_bootstrap, topic, 3)
    try:
        records = _records()
        await publish(kafka_bootstrap, topic, records)
        expected = await python_fold(kafka_bootstrap, topic)
        dump = tmp_path / "store.jsonl"
        run = await run_peer(
            classpath,
            kafka_bootstrap,
            topic,
            threads=2,
            dump=dump,
            log_dir=tmp_path / "logs",
            timeout_s=120,
        )
    finally:
        await delete_topics(kafka_bootstrap, [topic])
    assert run.events == len(records)
    # The poison records and the node's own events were left out, as the projector does.
    assert 0 < run.report["folded"] < len(records)
    assert differences(expected, dump) == []
    stored = {s.connection_id: s for s in read_dump(dump)}
    assert len(stored) == len(expected)
    assert stored["tie"].user_agent == "ua-\uffff"
    assert (stored["tie"].disconnect_status_code, stored["tie"].disconnect_reason) == (1000, "a")
    assert stored["late"].connected_at_ns == T0 + 200
    assert stored["late"].disconnected_at_ns == T0 + 100
    assert stored["late"].last_active_at_ns == T0 + 300
    assert stored["only-activity"].connected_at_ns is None
    assert (stored["on-node"].node_id, stored["on-node"].node_incarnation) == ("node-x", 2)
