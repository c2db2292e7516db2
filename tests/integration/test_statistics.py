"""Planner statistics of a freshly filled read model (core/statistics.py), on both backends: on
PostgreSQL a table that holds rows and was never analyzed is analyzed once, after which Get's
batch query and a selector page's rows are read by primary key even as generic plans; the
projector does it by itself, and a rebuild's new generation goes live analyzed. SQLite needs
nothing, and nothing is done there."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.read.statements import OPEN_MANY_PG
from conntrack.core.database import is_sqlite
from conntrack.core.schema import LIVE
from conntrack.core.settings import Settings
from conntrack.core.statistics import CHECK_INTERVAL_S, EarlyStatistics
from conntrack.core.store import ProjectionStore
from conntrack.producer.publisher import Publisher
from conntrack.projector.runner import Projector
from tests.support.projector import running
from tests.support.readmodel import ReadModel, opened, reltuples

TABLES = (LIVE.connections, LIVE.connection_labels)


async def generic_plan_of_get(engine: AsyncEngine, ids: list[str]) -> str:
    """The plan PostgreSQL caches for Get's batch query once it stops planning per call."""
    sql = str(OPEN_MANY_PG.compile(dialect=PGDialect_asyncpg()))  # type: ignore[no-untyped-call]
    array = "ARRAY[" + ",".join(f"'{i}'" for i in ids) + "]::text[]"
    async with engine.connect() as conn:
        await conn.execute(text("SET plan_cache_mode = force_generic_plan"))
        await conn.exec_driver_sql(f"PREPARE get_many AS {sql}")
        rows = await conn.exec_driver_sql(f"EXPLAIN EXECUTE get_many({array})")
        return "\n".join(str(r[0]) for r in rows)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def without_autovacuum(engine: AsyncEngine, tables: tuple[str, ...]) -> None:
    """Autovacuum (naptime a minute) may analyze a table while a test fills it, after which
    EarlyStatistics rightly leaves it alone; these tests are about what happens before."""
    if is_sqlite(engine):
        return
    async with engine.begin() as conn:
        for table in tables:
            await conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))


async def due_and_analyzed(statistics: EarlyStatistics, clock: Clock) -> list[str]:
    """after_write() once it finds something to analyze: the statistics system counts the rows
    a moment after they are written."""
    for _ in range(100):
        clock.now += CHECK_INTERVAL_S
        analyzed = await statistics.after_write()
        if analyzed:
            return analyzed
        await asyncio.sleep(0.1)
    return []


async def test_a_filled_table_is_analyzed_before_autovacuum_gets_to_it(
    engine: AsyncEngine,
) -> None:
    clock = Clock()
    statistics = EarlyStatistics(engine, TABLES, clock)
    await without_autovacuum(engine, ("connections", "connection_labels"))
    now = time.time_ns()
    states = [
        opened(f"c{i:05d}", "gw", now, node="n", incarnation=1, labels={"tier": "gold"})
        for i in range(3000)
    ]
    await ReadModel(engine).apply(states)
    if is_sqlite(engine):
        assert statistics.done
        assert await statistics.after_write() == []
        return
    assert await reltuples(engine, "connections") < 0  # PostgreSQL 14 on: never analyzed
    assert await due_and_analyzed(statistics, clock) == ["connection_labels", "connections"]
    assert await reltuples(engine, "connections") == 3000
    assert await reltuples(engine, "connection_labels") == 3000
    ids = [s.connection_id for s in states[:500]]
    assert "pk_connections" in await generic_plan_of_get(engine, ids)


@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_filling_table_is_analyzed_each_time_it_has_doubled(engine: AsyncEngine) -> None:
    clock = Clock()
    statistics = EarlyStatistics(engine, (LIVE.connections,), clock)
    await without_autovacuum(engine, ("connections",))
    model = ReadModel(engine)
    now = time.time_ns()

    async def add(first: int, count: int) -> None:
        await model.apply([opened(f"c{i:05d}", "gw", now) for i in range(first, first + count)])

    await add(0, 30)  # too few rows to learn from
    await asyncio.sleep(1.5)
    clock.now += CHECK_INTERVAL_S
    assert await statistics.after_write() == []
    await add(30, 70)
    assert await due_and_analyzed(statistics, clock) == ["connections"]
    assert await reltuples(engine, "connections") == 100
    await add(100, 100)  # 200 rows: not more than 2 x 100 + 50
    await asyncio.sleep(1.5)
    clock.now += CHECK_INTERVAL_S
    assert await statistics.after_write() == []
    await add(200, 100)
    assert await due_and_analyzed(statistics, clock) == ["connections"]
    assert await reltuples(engine, "connections") == 300
    # Between checks nothing is looked at.
    await add(300, 1000)
    assert await statistics.after_write() == []


@pytest.mark.kafka
@pytest.mark.parametrize("backend", ["postgres"])
async def test_the_projector_analyzes_a_fresh_read_model(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    async with (
        Publisher(
            kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic, "gw"
        ) as publisher,
        running(Projector(kafka_settings, ProjectionStore(engine))),
    ):
        for i in range(200):
            await publisher.connected(f"p{i}", "10.0.0.1", "ua", labels={"t": "x"})
        await publisher.flush()
        # A trickle after them: the projector looks after a batch is written, and the
        # statistics system counts the first rows a moment after they were.
        for i in range(60):
            await publisher.connected(f"q{i}", "10.0.0.1", "ua")
            await publisher.flush()
            if await reltuples(engine, "connections") > 0:
                break
            await asyncio.sleep(0.5)
        assert await reltuples(engine, "connections") >= 200
        assert await reltuples(engine, "connection_labels") == 200
