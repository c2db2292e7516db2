"""Planner statistics for the read model's tables on PostgreSQL.

A table PostgreSQL has never analyzed is planned as if a condition such as "disconnected_at_ns IS
NULL" held for 0.5% of its rows; statistics taken from a handful of rows mislead it as badly. The
read model's tables are the opposite (almost every row is an open connection), so until
autovacuum first analyzes them (up to a minute after they fill: its naptime) Get's and the
directory's queries run with plans that scan every open row of the table and test each against
the whole list of ids: a selector Send to 10,000 connections took 4 s instead of 0.6 s on a
fresh database (BENCHMARKS.md, figure 10). So the projector analyzes its tables as they fill,
until autovacuum first does (EarlyStatistics), and a rebuild analyzes its new generation before
switching it live (analyze); autovacuum keeps the statistics current from then on. SQLite needs
nothing: its planner takes the primary key or an index without them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger(__name__)

# How often the projector looks at its tables' statistics (one query on the catalog).
CHECK_INTERVAL_S = 5.0
# A table is analyzed again when its live rows are more than GROWTH times what the last analyze
# counted, plus FLOOR (statistics of a handful of rows mislead the planner as badly as none).
GROWTH = 2
FLOOR = 50

# reltuples: what the last ANALYZE (or VACUUM) counted; -1 before the first, from PostgreSQL 14
# (0 before 14, as for an analyzed empty table). n_live_tup: the live rows now, as the
# statistics system counts them. A table autovacuum has analyzed is left to autovacuum.
_DUE = text(
    "SELECT c.relname, s.last_autoanalyze IS NOT NULL AS autovacuum, "
    "pg_relation_size(c.oid) > 0 "
    "AND s.n_live_tup > GREATEST(c.reltuples, 0) * :growth + :floor AS due "
    "FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid "
    "WHERE c.oid IN (SELECT to_regclass(n) FROM unnest(CAST(:names AS text[])) AS n)"
)


def _quote(conn: AsyncConnection, name: str) -> str:
    return str(conn.dialect.identifier_preparer.quote(name))


async def analyze(engine: AsyncEngine, tables: Iterable[Table]) -> None:
    """ANALYZE these tables (PostgreSQL; nothing on SQLite)."""
    if engine.dialect.name != "postgresql":
        return
    async with engine.connect() as conn:
        for table in tables:
            await conn.execute(text(f"ANALYZE {_quote(conn, table.name)}"))
        await conn.commit()


class EarlyStatistics:
    """Until autovacuum first analyzes one of `tables`, analyzes it whenever it holds more than
    GROWTH times the rows its statistics were taken from (plus FLOOR; from none at all): a
    table filling from empty is analyzed a few times (about log2 of its final size), each
    time on twice the rows. Checks at most every CHECK_INTERVAL_S, when after_write() is
    called; none once autovacuum has analyzed every table. A role that may not analyze a
    table gets a WARNING from the server and no error."""

    def __init__(
        self,
        engine: AsyncEngine,
        tables: Iterable[Table],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        postgresql = engine.dialect.name == "postgresql"
        self._watched = sorted(t.name for t in tables) if postgresql else []
        self._clock = clock
        self._next_check = 0.0

    @property
    def done(self) -> bool:
        """Autovacuum looks after every table (always, on SQLite)."""
        return not self._watched

    async def after_write(self) -> list[str]:
        """Check (when due) and analyze; returns the names of the tables analyzed."""
        if not self._watched or self._clock() < self._next_check:
            return []
        self._next_check = self._clock() + CHECK_INTERVAL_S
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(_DUE, {"names": self._watched, "growth": GROWTH, "floor": FLOOR})
            ).all()
            self._watched = sorted(str(r.relname) for r in rows if not r.autovacuum)
            names = sorted(str(r.relname) for r in rows if r.due and not r.autovacuum)
            for name in names:
                await conn.execute(text(f"ANALYZE {_quote(conn, name)}"))
            await conn.commit()
        if names:
            log.info("event=tables_analyzed tables=%s", ",".join(names))
        return names
