"""The Alembic migrations and conntrack.core.schema agree, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateTable

from conntrack.core.database import create_engine
from conntrack.core.schema import CONNECTIONS_FILLFACTOR, generation, metadata
from conntrack.migrations.cli import SCRIPT_LOCATION, alembic_config, downgrade, upgrade


def _diff(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


def _tables_and_indexes(conn: Connection) -> dict[str, list[str]]:
    insp = inspect(conn)
    return {
        t: sorted(str(i["name"]) for i in insp.get_indexes(t))
        for t in sorted(insp.get_table_names())
        if t != "alembic_version"
    }


async def _inspect(url: str) -> tuple[list[Any], dict[str, list[str]]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_diff), await conn.run_sync(_tables_and_indexes)
    finally:
        await engine.dispose()


async def test_migrated_database_matches_the_models(database_url: str) -> None:
    diff, tables = await _inspect(database_url)
    assert diff == []
    assert tables == {
        "connection_history": [
            "ix_connection_history_bucket",
            "ix_connection_history_id",
            "ix_connection_history_principal",
        ],
        "connection_labels": ["ix_connection_labels_gateway_id"],
        "connections": [
            "ix_connections_disconnected_at_ns",
            "ix_connections_gateway_id",
            "ix_connections_principal",
        ],
        "history_since": [],
        "node_fences": [],
        "node_sightings": [],
        "nodes": [],
        "projection_offsets": [],
        "pruned_connections": ["ix_pruned_connections_disconnected_at_ns"],
    }


async def test_upgrade_downgrade_upgrade(empty_database_url: str) -> None:
    url = empty_database_url
    revisions = [
        s.revision for s in reversed(list(ScriptDirectory(str(SCRIPT_LOCATION)).walk_revisions()))
    ]
    assert revisions[0] == "0001"
    # Step up one revision at a time, then all the way down, then up again. (Alembic's env.py
    # runs its own event loop, hence the threads.)
    for rev in revisions:
        await asyncio.to_thread(upgrade, url, rev)
    assert (await _inspect(url))[0] == []
    await asyncio.to_thread(downgrade, url, "0001")
    _, tables = await _inspect(url)
    assert "pruned_connections" not in tables
    assert tables["connections"] == []
    await asyncio.to_thread(downgrade, url, "base")
    assert (await _inspect(url))[1] == {}
    await asyncio.to_thread(upgrade, url)
    assert (await _inspect(url))[0] == []


async def _fillfactor(url: str, table: str = "connections") -> str | None:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            options = await conn.run_sync(lambda c: inspect(c).get_table_options(table))
    finally:
        await engine.dispose()
    fillfactor = options.get("postgresql_with", {}).get("fillfactor")
    return None if fillfactor is None else str(fillfactor)


async def test_connections_leave_room_for_hot_updates_on_postgresql(
    empty_database_url: str, backend: str
) -> None:
    """Migration 0003 and the model (which rebuilds' shadow tables are created from) agree."""
    url = empty_database_url
    await asyncio.to_thread(upgrade, url)
    if backend != "postgres":
        # A PostgreSQL storage parameter: SQLite has no such option, and the migration is a no-op.
        assert await _fillfactor(url) is None
        return
    assert await _fillfactor(url) == str(CONNECTIONS_FILLFACTOR)
    await asyncio.to_thread(downgrade, url, "0002")
    assert await _fillfactor(url) is None
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(CreateTable(generation("_probe").connections))
    finally:
        await engine.dispose()
    assert await _fillfactor(url, "connections_probe") == str(CONNECTIONS_FILLFACTOR)


def test_the_revision_history_is_linear() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite+aiosqlite:///:memory:"))
    assert len(script.get_heads()) == 1
