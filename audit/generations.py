"""The read model's generations in one database: the live tables, the shadow a rebuild folds the
log into (`*_rebuild`), and the retired one the last switch kept (`*_retired`): making, checking
and dropping them, and the statements of the switch that makes the shadow live."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, Table, inspect, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.schema import CreateIndex, CreateTable, DropIndex

from conntrack.core.schema import LIVE, ReadModelTables, generation

SHADOW = generation("_rebuild")
RETIRED = generation("_retired")


class RebuildError(RuntimeError):
    """The rebuild cannot go on; nothing live was changed."""


async def _table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def _drop(engine: AsyncEngine, tables: ReadModelTables) -> bool:
    names = await _table_names(engine)
    present = [t for t in tables.all if t.name in names]
    if not present:
        return False
    async with engine.begin() as conn:
        for t in present:
            await conn.execute(text(f"DROP TABLE IF EXISTS {quote(conn, t.name)}"))
    return True


async def abandon(engine: AsyncEngine) -> bool:
    """Drop the shadow tables of an unfinished rebuild. Returns whether there were any."""
    return await _drop(engine, SHADOW)


async def drop_retired(engine: AsyncEngine) -> bool:
    """Drop the previous generation kept by the last switch. Returns whether there was one."""
    return await _drop(engine, RETIRED)


async def shadow_exists(engine: AsyncEngine) -> bool:
    return bool(await _table_names(engine) & {t.name for t in SHADOW.all})


def quote(conn: AsyncConnection, name: str) -> str:
    return str(conn.dialect.identifier_preparer.quote(name))


def _column_names(conn: Connection, table: str) -> list[str]:
    return [col["name"] for col in inspect(conn).get_columns(table)]


async def prepare_shadow(engine: AsyncEngine) -> bool:
    """Create the shadow tables, or check the ones an interrupted rebuild left. Returns
    whether they existed (a resume)."""
    names = await _table_names(engine)
    existing = [t for t in SHADOW.all if t.name in names]
    if existing and len(existing) != len(SHADOW.all):
        raise RebuildError(
            f"only some shadow tables exist ({', '.join(t.name for t in existing)}); "
            "run `conntrack-audit rebuild --abandon` and start again"
        )
    if existing:
        async with engine.connect() as conn:
            for shadow, live in zip(SHADOW.all, LIVE.all, strict=True):
                got = await conn.run_sync(_column_names, shadow.name)
                if got != [c.name for c in live.columns]:
                    raise RebuildError(
                        f"{shadow.name} has columns {got}, the schema now has "
                        f"{[c.name for c in live.columns]} (migrated since the rebuild began?); "
                        "run `conntrack-audit rebuild --abandon` and start again"
                    )
        return True
    async with engine.begin() as conn:
        for t in SHADOW.all:
            await conn.execute(CreateTable(t))
            # SQLite cannot rename an index, so the switch creates the live index names on the
            # new generation itself; building them here would be wasted work.
            if conn.dialect.name != "sqlite":
                for ix in t.indexes:
                    await conn.execute(CreateIndex(ix))
    return False


def switch_ddl(conn: AsyncConnection, sqlite: bool) -> list[str]:
    """Statements that make the shadow live and keep the old live generation as retired."""
    q = conn.dialect.identifier_preparer.quote
    out = [f"DROP TABLE IF EXISTS {q(t.name)}" for t in RETIRED.all]
    for live, shadow, retired in zip(LIVE.all, SHADOW.all, RETIRED.all, strict=True):
        out.append(f"ALTER TABLE {q(live.name)} RENAME TO {q(retired.name)}")
        if sqlite:
            # Index names are global in SQLite and cannot be renamed: the retired generation
            # (kept for inspection, never queried by the service) loses its secondary indexes,
            # and the new live tables get theirs built here under the live names.
            out += [str(DropIndex(ix).compile(dialect=conn.dialect)) for ix in live.indexes]
        else:
            out += _rename_constraints(q, live, retired)
        out.append(f"ALTER TABLE {q(shadow.name)} RENAME TO {q(live.name)}")
        if sqlite:
            out += [str(CreateIndex(ix).compile(dialect=conn.dialect)) for ix in live.indexes]
        else:
            out += _rename_constraints(q, shadow, live)
    return out


def _rename_constraints(q: Callable[[str], str], old: Table, new: Table) -> list[str]:
    """PostgreSQL: give a table just renamed from old.name to new.name the primary key and
    index names of its new generation, so the next rebuild can create its shadow again."""
    out = [
        f"ALTER TABLE {q(new.name)} RENAME CONSTRAINT {q(str(old.primary_key.name))} "
        f"TO {q(str(new.primary_key.name))}"
    ]
    by_columns = {tuple(c.name for c in ix.columns): ix for ix in new.indexes}
    for ix in old.indexes:
        target = by_columns[tuple(c.name for c in ix.columns)]
        out.append(f"ALTER INDEX {q(str(ix.name))} RENAME TO {q(str(target.name))}")
    return out
