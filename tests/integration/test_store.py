"""The read-model store's contract, on SQLite and on PostgreSQL (the engine fixture runs each
test once per backend)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Mapping

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.core.database import create_engine
from conntrack.core.events import (
    MAX_TIME_NS,
    Activity,
    Connected,
    Disconnected,
    Event,
    Payload,
)
from conntrack.core.fold import ConnectionState, NodeState, fold, merge, merge_nodes, of_event
from conntrack.core.labels import from_json
from conntrack.core.schema import connection_labels
from conntrack.core.store import (
    ARRAY_CHUNK,
    CHUNK,
    PG_BULK_PATHS,
    REFUSALS,
    FencedError,
    ProjectionStore,
)

T0 = 1_764_300_000_000_000_000
TOPIC = "events"


def random_events(rnd: random.Random, prefix: str, n: int, connections: int) -> list[Event]:
    out = []
    for i in range(n):
        cid = f"{prefix}-{rnd.randrange(connections)}"
        at = T0 + rnd.randrange(10**12)
        labels = rnd.choice([(), (("tenant", "t1"),), (("device", "ios"), ("tenant", "t2"))])
        choices: list[Payload] = [
            Connected(f"10.0.0.{rnd.randrange(256)}", rnd.choice(["ua-1", "ua-2"])),
            Connected(
                "10.0.0.1", "ua-1", principal=rnd.choice(["", "alice", "bob"]), labels=labels
            ),
            Activity(rnd.randrange(5)),
            Disconnected(rnd.choice([1000, 1001, 1006]), rnd.choice(["", "bye"])),
        ]
        payload = rnd.choice(choices)
        out.append(Event(f"{prefix}-e{i}", cid, rnd.choice(["gw-a", "gw-b"]), at, payload))
    return out


async def test_positions_start_at_zero_and_persist(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine)
    assert await store.positions(TOPIC, [2, 0, 1, 1]) == {0: 0, 1: 0, 2: 0}
    await store.apply_batch(TOPIC, {1: (0, 17)}, {})
    assert await store.positions(TOPIC, [0, 1]) == {0: 0, 1: 17}
    assert await store.positions(TOPIC, []) == {}
    assert await store.all_positions() == {(TOPIC, 0): 0, (TOPIC, 1): 17, (TOPIC, 2): 0}
    # Positions of another topic are separate.
    assert await store.positions("other", [1]) == {1: 0}


async def test_a_stale_expected_offset_is_fenced_and_changes_nothing(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine)
    await store.positions(TOPIC, [0, 1])
    first = of_event(Event("e1", "c1", "gw", T0, Connected("10.0.0.1", "ua")))
    await store.apply_batch(TOPIC, {0: (0, 10)}, {"c1": first})
    intruder = of_event(Event("e0", "c1", "gw-x", T0 - 5, Connected("10.6.6.6", "evil")))
    other = of_event(Event("e2", "c2", "gw", T0, Connected("10.0.0.2", "ua")))
    # Partition 1 would advance fine, but partition 0 is stale: the whole batch rolls back.
    with pytest.raises(FencedError, match=r"\[0\] is no longer at offset 0"):
        await store.apply_batch(TOPIC, {1: (0, 5), 0: (0, 20)}, {"c1": intruder, "c2": other})
    assert await store.all_positions() == {(TOPIC, 0): 10, (TOPIC, 1): 0}
    assert await store.all_states() == {"c1": first}


async def test_an_unknown_partition_is_fenced(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine)
    with pytest.raises(FencedError):
        await store.apply_batch(TOPIC, {7: (0, 1)}, {})


async def test_two_writers_with_the_same_expected_offset_one_wins(database_url: str) -> None:
    engines = [create_engine(database_url), create_engine(database_url)]
    try:
        stores = [ProjectionStore(e) for e in engines]
        await stores[0].positions(TOPIC, [0])
        states = [{"c": of_event(Event(f"e{i}", "c", "gw", T0 + i, Activity()))} for i in range(2)]
        results = await asyncio.gather(
            *(s.apply_batch(TOPIC, {0: (0, 5 + i)}, states[i]) for i, s in enumerate(stores)),
            return_exceptions=True,
        )
        fenced = [r for r in results if isinstance(r, FencedError)]
        assert len(fenced) == 1, results
        winner = next(i for i, r in enumerate(results) if not isinstance(r, BaseException))
        assert await stores[0].all_positions() == {(TOPIC, 0): 5 + winner}
        assert await stores[0].all_states() == states[winner]
    finally:
        for e in engines:
            await e.dispose()


async def test_writers_of_different_partitions_merge_the_same_rows_correctly(
    database_url: str,
) -> None:
    """After a change of the partition count, one connection's events can sit in two partitions
    with two owners, whose batches then write the same rows at the same time (new rows too)."""
    rnd = random.Random(5)
    engines = [create_engine(database_url), create_engine(database_url)]
    try:
        stores = [ProjectionStore(e) for e in engines]
        await stores[0].positions(TOPIC, [0, 1])
        logs: list[list[Event]] = [[], []]
        for round_ in range(8):
            batches = [random_events(rnd, f"r{round_}w{w}", 300, 40) for w in range(2)]
            # The same connection ids on both sides.
            batches = [
                [dataclasses.replace(e, connection_id=e.connection_id.split("-")[-1]) for e in b]
                for b in batches
            ]
            await asyncio.gather(
                *(
                    stores[w].apply_batch(
                        TOPIC, {w: (round_ * 300, (round_ + 1) * 300)}, fold(batches[w])
                    )
                    for w in range(2)
                )
            )
            for w in range(2):
                logs[w] += batches[w]
        assert await stores[0].all_states() == fold(logs[0] + logs[1])
    finally:
        for e in engines:
            await e.dispose()


@pytest.mark.parametrize("seed", range(4))
async def test_batches_merged_with_stored_rows_equal_one_fold(
    engine: AsyncEngine, seed: int
) -> None:
    rnd = random.Random(seed)
    events = random_events(rnd, f"s{seed}", 400, 60)
    store = ProjectionStore(engine)
    await store.positions(TOPIC, [0])
    # Replay with duplicates, shuffled, in batches of random sizes.
    log = events + rnd.sample(events, 100)
    rnd.shuffle(log)
    offset = 0
    while offset < len(log):
        size = rnd.randint(1, 80)
        batch = log[offset : offset + size]
        await store.apply_batch(TOPIC, {0: (offset, offset + len(batch))}, fold(batch))
        offset += len(batch)
    assert await store.all_states() == fold(events)
    assert await store.all_positions() == {(TOPIC, 0): len(log)}
    assert await label_rows(engine) == expected_label_rows(fold(events))


async def label_rows(engine: AsyncEngine) -> set[tuple[str, str, str, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(connection_labels))
        return {(r.connection_id, r.key, r.value, r.gateway_id) for r in rows}


def expected_label_rows(
    states: Mapping[str, ConnectionState],
) -> set[tuple[str, str, str, str]]:
    """The label index's definition: every label of every open connection."""
    return {
        (cid, key, value, s.gateway_id)
        for cid, s in states.items()
        if s.connected_at_ns is not None
        and s.disconnected_at_ns is None
        and s.gateway_id is not None
        for key, value in from_json(s.labels).items()
    }


def random_state(rnd: random.Random, cid: str) -> ConnectionState:
    """A state from small domains, so that pairs tie on times and ids and differ only in later
    parts of the order; mixed case and non-ASCII text tell a code-point order from a locale's."""

    def text(options: list[str | None]) -> str | None:
        return rnd.choice(options)

    words: list[str | None] = [None, "", "a", "B", "b", "Z", "é", "ё", "\U0001f642", "aa"]
    connected = rnd.random() < 0.7
    disconnected = rnd.random() < 0.5
    times = [T0, T0 + 1, T0 + 2]
    return ConnectionState(
        cid,
        gateway_id=text(words) if connected else None,
        source_ip=text(words) if connected else None,
        user_agent=text(words) if connected else None,
        connected_at_ns=rnd.choice(times) if connected else None,
        connected_event_id=text(["e", "E", "é", "e2"]) if connected else None,
        last_active_at_ns=rnd.choice([None, *times]),
        disconnected_at_ns=rnd.choice(times) if disconnected else None,
        disconnect_status_code=rnd.choice([None, 0, 9, 10, 1000, 65535]) if disconnected else None,
        disconnect_reason=text(words) if disconnected else None,
        disconnected_event_id=text(["d", "D", "ð", "d2"]) if disconnected else None,
        node_id=text([None, "n", "N", "é"]) if connected else None,
        node_incarnation=rnd.choice([None, 1, 2, 2**62]) if connected else None,
        principal=text([None, "p", "P", "é"]) if connected else None,
        labels=text([None, '{"a":"1"}', '{"a":"2"}', '{"b":"1"}']) if connected else None,
    )


def random_node(rnd: random.Random, node_id: str) -> NodeState:
    return NodeState(
        node_id,
        incarnation=rnd.choice([1, 2, 2**62]),
        started_at_ns=rnd.choice([None, T0, T0 + 1]),
        last_seen_ns=rnd.choice([T0, T0 + 1, T0 + 2]),
        gateway_id=rnd.choice(["g", "G", "é", "gg"]),
        fenced_through=(fenced := rnd.choice([0, 1, 2])),
        fenced_at_ns=rnd.choice([T0, T0 + 1]) if fenced else None,
    )


@pytest.mark.parametrize("seed", range(3))
async def test_the_database_merge_of_nodes_equals_the_fold_merge(
    engine: AsyncEngine, seed: int
) -> None:
    rnd = random.Random(seed)
    store = ProjectionStore(engine)
    await store.positions(TOPIC, [0])
    pairs = {f"n{i}": (random_node(rnd, f"n{i}"), random_node(rnd, f"n{i}")) for i in range(500)}
    await store.apply_batch(TOPIC, {0: (0, 1)}, {}, {n: a for n, (a, _) in pairs.items()})
    await store.apply_batch(TOPIC, {0: (1, 2)}, {}, {n: b for n, (_, b) in pairs.items()})
    stored = await store.nodes()
    wrong = {n: (a, b, stored[n]) for n, (a, b) in pairs.items() if stored[n] != merge_nodes(a, b)}
    assert not wrong, next(iter(wrong.values()))


@pytest.mark.parametrize("pg_bulk", PG_BULK_PATHS)
@pytest.mark.parametrize("seed", range(3))
async def test_the_database_merge_equals_the_fold_merge(
    engine: AsyncEngine, seed: int, pg_bulk: str
) -> None:
    """The store merges in SQL; core/fold.py's merge() is the definition. On
    PostgreSQL both ways of sending a batch (COPY into a staging table, arrays) are checked."""
    if engine.dialect.name != "postgresql" and pg_bulk != PG_BULK_PATHS[0]:
        pytest.skip("one path on SQLite")
    rnd = random.Random(seed)
    store = ProjectionStore(engine, pg_bulk=pg_bulk)
    await store.positions(TOPIC, [0])
    pairs = {f"c{i}": (random_state(rnd, f"c{i}"), random_state(rnd, f"c{i}")) for i in range(3000)}
    await store.apply_batch(TOPIC, {0: (0, 1)}, {cid: a for cid, (a, _) in pairs.items()})
    result = await store.apply_batch(TOPIC, {0: (1, 2)}, {cid: b for cid, (_, b) in pairs.items()})
    assert (result.written, result.suppressed) == (len(pairs), 0)
    stored = await store.all_states()
    wrong = {
        cid: (a, b, stored[cid], merge(a, b))
        for cid, (a, b) in pairs.items()
        if stored[cid] != merge(a, b)
    }
    assert not wrong, next(iter(wrong.values()))
    assert await label_rows(engine) == expected_label_rows(stored)


async def test_timestamps_are_exact_to_the_nanosecond(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine)
    await store.positions(TOPIC, [0])
    times = [T0 + 123_456_789, MAX_TIME_NS - 1, 946_684_800_000_000_001]
    events = [
        Event(f"e{i}", f"c{i}", "gw", at, Connected("::1", "ua")) for i, at in enumerate(times)
    ]
    await store.apply_batch(TOPIC, {0: (0, 3)}, fold(events))
    for i, at in enumerate(times):
        state = await store.get(f"c{i}")
        assert state is not None
        assert state.connected_at_ns == at
        assert state.last_active_at_ns == at
    assert await store.get("never") is None


@pytest.mark.parametrize("pg_bulk", PG_BULK_PATHS)
async def test_batches_larger_than_a_chunk(engine: AsyncEngine, pg_bulk: str) -> None:
    if engine.dialect.name != "postgresql" and pg_bulk != PG_BULK_PATHS[0]:
        pytest.skip("one path on SQLite")
    store = ProjectionStore(engine, pg_bulk=pg_bulk)
    await store.positions(TOPIC, [0, 1])
    # More than two chunks on either backend (SQLite binds CHUNK ids, PostgreSQL ARRAY_CHUNK).
    n = max(CHUNK, ARRAY_CHUNK) * 2 + 37
    connects = [
        Event(f"c{i}", f"conn-{i:05d}", "gw", T0 + i, Connected("10.0.0.1", "ua")) for i in range(n)
    ]
    result = await store.apply_batch(TOPIC, {0: (0, n)}, fold(connects))
    assert (result.written, result.suppressed) == (n, 0)
    # A second large batch on another partition touching every stored row and some new ones.
    more = [
        Event(f"d{i}", f"conn-{i:05d}", "gw", T0 + 10**9 + i, Disconnected(1000, ""))
        for i in range(0, n + 100, 2)
    ]
    await store.apply_batch(TOPIC, {1: (0, len(more))}, fold(more))
    assert await store.all_states() == fold(connects + more)
    assert await store.count() == n + 50


async def test_prune_removes_old_disconnected_rows_and_leaves_tombstones(
    engine: AsyncEngine,
) -> None:
    store = ProjectionStore(engine)
    await store.positions(TOPIC, [0])
    events = [
        Event("c-old", "old", "gw", T0, Connected("::1", "ua")),
        Event("d-old", "old", "gw", T0 + 10, Disconnected(1000, "")),
        Event("c-recent", "recent", "gw", T0, Connected("::1", "ua")),
        Event("d-recent", "recent", "gw", T0 + 1000, Disconnected(1000, "")),
        Event("c-open", "open", "gw", T0, Connected("::1", "ua")),
    ]
    await store.apply_batch(TOPIC, {0: (0, 5)}, fold(events))
    result = await store.prune(disconnected_before_ns=T0 + 500, tombstones_before_ns=None)
    assert (result.pruned, result.tombstones_expired) == (1, 0)
    assert set(await store.all_states()) == {"recent", "open"}
    assert await store.tombstones() == {"old": T0 + 10}
    # A late duplicate (and a late activity) of the pruned connection does not resurrect it;
    # the rest of the batch is applied.
    late = [events[0], Event("a-late", "old", "gw", T0 + 20, Activity()), events[4]]
    applied = await store.apply_batch(TOPIC, {0: (5, 8)}, fold(late))
    assert (applied.written, applied.suppressed) == (1, 1)
    assert await store.get("old") is None
    # Pruning again is a no-op; tombstones expire on their own clock.
    assert (await store.prune(T0 + 500, None)).pruned == 0
    expired = await store.prune(T0 + 500, tombstones_before_ns=T0 + 11)
    assert expired.tombstones_expired == 1
    assert await store.tombstones() == {}


async def test_prune_works_in_bounded_steps(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine)
    await store.positions(TOPIC, [0])
    gone = [Event(f"d{i}", f"c{i}", "gw", T0 + i, Disconnected(1000, "")) for i in range(25)]
    await store.apply_batch(TOPIC, {0: (0, 25)}, fold(gone))
    steps = []
    while True:
        result = await store.prune(T0 + 100, T0 + 100, limit=10)
        steps.append((result.pruned, result.tombstones_expired))
        if result.pruned < 10 and result.tombstones_expired < 10:
            break
    assert sum(p for p, _ in steps) == 25
    assert all(p <= 10 and t <= 10 for p, t in steps)
    assert await store.count() == 0


async def test_state_fields_round_trip(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine)
    await store.positions(TOPIC, [0])
    state = ConnectionState(
        "c",
        gateway_id="g" * 255,
        source_ip="2001:db8::1",
        user_agent="Ünïcødé ✓ " * 100,
        connected_at_ns=T0,
        connected_event_id="e" * 255,
        last_active_at_ns=T0 + 2,
        disconnected_at_ns=T0 + 2,
        disconnect_status_code=65535,
        disconnect_reason="ы" * 300,
        disconnected_event_id="d",
        node_id="n" * 255,
        node_incarnation=2**63 - 1,
        principal="ü" * 255,
        labels='{"k":"' + "v" * 255 + '"}',
    )
    await store.apply_batch(TOPIC, {0: (0, 2)}, {"c": state})
    assert await store.get("c") == state


async def _refuse_user_agent(engine: AsyncEngine, user_agent: str) -> None:
    """Make the database refuse rows with this user agent, as a future constraint might."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.exec_driver_sql(
                "ALTER TABLE connections ADD CONSTRAINT refused_for_the_test "
                f"CHECK (user_agent IS DISTINCT FROM '{user_agent}')"
            )
        else:
            await conn.exec_driver_sql(
                "CREATE TRIGGER refused_for_the_test BEFORE INSERT ON connections "
                f"WHEN NEW.user_agent = '{user_agent}' "
                "BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
            )


@pytest.mark.parametrize("pg_bulk", PG_BULK_PATHS)
async def test_refused_states_are_isolated_and_the_rest_commits_with_the_positions(
    engine: AsyncEngine, pg_bulk: str
) -> None:
    if engine.dialect.name != "postgresql" and pg_bulk != PG_BULK_PATHS[0]:
        pytest.skip("one path on SQLite")
    store = ProjectionStore(engine, pg_bulk=pg_bulk)
    await store.positions(TOPIC, [0, 1])
    gone = [Event("d-gone", "gone", "gw", T0, Disconnected(1000, ""))]
    await store.apply_batch(TOPIC, {0: (0, 1)}, fold(gone))
    assert (await store.prune(T0 + 1, None)).pruned == 1
    await _refuse_user_agent(engine, "refuse-me")
    events = [
        Event(f"c{i}", f"conn-{i:03d}", "gw", T0 + i, Connected("::1", "ua")) for i in range(200)
    ]
    bad = [
        Event(f"b{i}", f"conn-{i:03d}", "gw", T0 - 1, Connected("::1", "refuse-me"))
        for i in (3, 117, 118)
    ]
    late = [Event("a-gone", "gone", "gw", T0 + 5, Activity())]
    states = fold(events + bad + late)
    # Without isolation the whole batch, positions included, is refused.
    with pytest.raises(REFUSALS):
        await store.apply_batch(TOPIC, {0: (1, 205), 1: (0, 0)}, states)
    assert await store.all_positions() == {(TOPIC, 0): 1, (TOPIC, 1): 0}
    assert await store.count() == 0
    seen: list[dict[str, str]] = []

    async def on_refused(refused: dict[str, str]) -> None:
        seen.append(refused)

    result = await store.apply_batch(TOPIC, {0: (1, 205), 1: (0, 0)}, states, None, on_refused)
    assert (result.written, result.suppressed, result.refused) == (197, 1, 3)
    assert len(seen) == 1
    assert set(seen[0]) == {"conn-003", "conn-117", "conn-118"}
    assert all(why.startswith("database refused: ") for why in seen[0].values())
    assert await store.all_positions() == {(TOPIC, 0): 205, (TOPIC, 1): 0}
    refused = {"conn-003", "conn-117", "conn-118"}
    assert await store.all_states() == {
        cid: s for cid, s in fold(events).items() if cid not in refused
    }


@pytest.mark.parametrize("pg_bulk", PG_BULK_PATHS)
async def test_two_batches_in_one_transaction(engine: AsyncEngine, pg_bulk: str) -> None:
    """apply_batch_in() twice in the caller's transaction (a rebuild's switch may): the second
    merge sees only its own states (COPY's staging table is emptied between them)."""
    if engine.dialect.name != "postgresql" and pg_bulk != PG_BULK_PATHS[0]:
        pytest.skip("one path on SQLite")
    store = ProjectionStore(engine, pg_bulk=pg_bulk)
    await store.positions(TOPIC, [0])
    first = [Event(f"c{i}", f"conn-{i}", "gw", T0 + i, Connected("::1", "ua")) for i in range(50)]
    second = [Event(f"d{i}", f"conn-{i}", "gw", T0 + 100, Disconnected(1000, "")) for i in range(7)]
    async with engine.begin() as conn:
        one = await store.apply_batch_in(conn, TOPIC, {0: (0, 50)}, fold(first))
        two = await store.apply_batch_in(conn, TOPIC, {0: (50, 57)}, fold(second))
    assert (one.written, two.written) == (50, 7)
    assert await store.all_states() == fold(first + second)
    assert await store.all_positions() == {(TOPIC, 0): 57}
