"""core/fold.py's merge() written in SQL, for each backend and each of PostgreSQL's bulk paths:
one `INSERT .. ON CONFLICT DO UPDATE` whose SET clause is the merge (so a batch costs one
statement and no read-back), reached by binary COPY into a staging table (pg_copy_merge), by
arrays (pg_merge) or, on SQLite, by executemany (sqlite_merge); and the merge of node states.
core/store.py runs them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import BigInteger, Integer, String, Table, bindparam, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.compiler import IdentifierPreparer

from conntrack.core.fold import ConnectionState, NodeState
from conntrack.core.schema import ReadModelTables

STATE_FIELDS = ConnectionState._fields


def dialect_insert(conn: AsyncConnection) -> Callable[..., Any]:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


# merge() in SQL. In the SET clause `existing` is the stored row and EXCLUDED the batch's state;
# every expression sees the stored row as it was before the update. Each key is the tuple
# core/fold.py orders events by: (time, event id, then the contents), NULL
# text as "" and a NULL status as 0; the zero-padded status string of _disconnected_key_of
# orders like the integer. Text compares by code point, as Python does: the "C" collation on
# PostgreSQL, and SQLite's default BINARY (both compare UTF-8 bytes, which orders like code
# points).
_CONNECTED_KEY = (
    "connected_at_ns",
    "connected_event_id",
    "gateway_id",
    "source_ip",
    "user_agent",
    "node_id",
    "node_incarnation",
    "principal",
    "labels",
)
_CONNECTED_FIELDS = (
    "gateway_id",
    "source_ip",
    "user_agent",
    "connected_at_ns",
    "connected_event_id",
    "node_id",
    "node_incarnation",
    "principal",
    "labels",
)
_DISCONNECTED_KEY = (
    "disconnected_at_ns",
    "disconnected_event_id",
    "disconnect_status_code",
    "disconnect_reason",
)
_DISCONNECTED_FIELDS = _DISCONNECTED_KEY


def _key_sql(row: str, key: tuple[str, ...], table: Table, collate: str) -> str:
    parts = [f"{row}.{key[0]}"]
    for name in key[1:]:
        column = table.c[name]
        if isinstance(column.type, Integer):  # BigInteger too
            parts.append(f"COALESCE({row}.{name}, 0)")
        elif name in ("connected_event_id", "disconnected_event_id"):
            parts.append(f"{row}.{name}{collate}")
        else:
            parts.append(f"COALESCE({row}.{name}, ''){collate}")
    return "(" + ", ".join(parts) + ")"


def _earlier_sql(key: tuple[str, ...], existing: str, table: Table, collate: str) -> str:
    """Whether the batch's event of this kind sorts strictly before the stored one (a missing
    event sorts last: core/fold.py's _earlier())."""
    at, event_id = key[0], key[1]
    new_key = _key_sql("EXCLUDED", key, table, collate)
    old_key = _key_sql(existing, key, table, "")
    return (
        f"(EXCLUDED.{at} IS NOT NULL AND EXCLUDED.{event_id} IS NOT NULL AND "
        f"({existing}.{at} IS NULL OR {existing}.{event_id} IS NULL OR {new_key} < {old_key}))"
    )


def _merge_assignments(table: Table, existing: str, collate: str) -> str:
    """The SET clause of the merging upsert. Column names are plain identifiers (checked)."""
    assert all(n.isidentifier() and n.islower() for n in STATE_FIELDS)
    connected = _earlier_sql(_CONNECTED_KEY, existing, table, collate)
    disconnected = _earlier_sql(_DISCONNECTED_KEY, existing, table, collate)
    sets = [
        f"{n} = CASE WHEN {connected} THEN EXCLUDED.{n} ELSE {existing}.{n} END"
        for n in _CONNECTED_FIELDS
    ]
    sets.append(
        "last_active_at_ns = CASE WHEN "
        f"{existing}.last_active_at_ns IS NULL OR "
        f"EXCLUDED.last_active_at_ns > {existing}.last_active_at_ns "
        f"THEN EXCLUDED.last_active_at_ns ELSE {existing}.last_active_at_ns END"
    )
    sets += [
        f"{n} = CASE WHEN {disconnected} THEN EXCLUDED.{n} ELSE {existing}.{n} END"
        for n in _DISCONNECTED_FIELDS
    ]
    assert {n for n in STATE_FIELDS if n != "connection_id"} == {s.split(" = ", 1)[0] for s in sets}
    return ", ".join(sets)


@functools.cache
def nodes_merge(tables: ReadModelTables, preparer: IdentifierPreparer, dialect: str) -> Any:
    """conntrack.core.fold.merge_nodes() in SQL: a newer incarnation takes the row; within
    one, the earliest start, the latest sighting and the least gateway id (by code point); the
    highest fence, and of equal ones the earliest, whatever the incarnation."""
    table = preparer.format_table(tables.nodes)
    collate = ' COLLATE "C"' if dialect == "postgresql" else ""
    new, old = "EXCLUDED", "existing"
    newer = f"{new}.incarnation > {old}.incarnation"
    older = f"{new}.incarnation < {old}.incarnation"

    def pick(same: str, name: str) -> str:
        return (
            f"{name} = CASE WHEN {newer} THEN {new}.{name} WHEN {older} THEN {old}.{name} "
            f"ELSE {same} END"
        )

    started = (
        f"CASE WHEN {old}.started_at_ns IS NULL THEN {new}.started_at_ns "
        f"WHEN {new}.started_at_ns IS NULL THEN {old}.started_at_ns "
        f"WHEN {new}.started_at_ns < {old}.started_at_ns THEN {new}.started_at_ns "
        f"ELSE {old}.started_at_ns END"
    )
    seen = (
        f"CASE WHEN {new}.last_seen_ns > {old}.last_seen_ns THEN {new}.last_seen_ns "
        f"ELSE {old}.last_seen_ns END"
    )
    gateway = (
        f"CASE WHEN {new}.gateway_id{collate} < {old}.gateway_id{collate} THEN {new}.gateway_id "
        f"ELSE {old}.gateway_id END"
    )
    higher_fence = f"{new}.fenced_through > {old}.fenced_through"
    fence = (
        f"fenced_through = CASE WHEN {higher_fence} THEN {new}.fenced_through "
        f"ELSE {old}.fenced_through END"
    )
    fenced_at = (
        f"fenced_at_ns = CASE WHEN {higher_fence} THEN {new}.fenced_at_ns "
        f"WHEN {new}.fenced_through < {old}.fenced_through THEN {old}.fenced_at_ns "
        f"WHEN {old}.fenced_at_ns IS NULL THEN {new}.fenced_at_ns "
        f"WHEN {new}.fenced_at_ns IS NULL THEN {old}.fenced_at_ns "
        f"WHEN {new}.fenced_at_ns < {old}.fenced_at_ns THEN {new}.fenced_at_ns "
        f"ELSE {old}.fenced_at_ns END"
    )
    names = ", ".join(NodeState._fields)
    values = ", ".join(f":{n}" for n in NodeState._fields)
    return text(
        f"INSERT INTO {table} AS {old} ({names}) VALUES ({values}) "
        "ON CONFLICT (node_id) DO UPDATE SET "
        + ", ".join(
            [
                pick(started, "started_at_ns"),
                pick(seen, "last_seen_ns"),
                pick(gateway, "gateway_id"),
                f"incarnation = CASE WHEN {newer} THEN {new}.incarnation "
                f"ELSE {old}.incarnation END",
                fence,
                fenced_at,
            ]
        )
    )


@dataclass(frozen=True, slots=True)
class LabelStatements:
    clear: Any  # deletes the label rows of :ids
    fill: Any  # inserts the label rows of those of :ids that are open and labelled


@functools.cache
def label_index(tables: ReadModelTables, preparer: IdentifierPreparer, dialect: str) -> Any:
    """The label index's upkeep (core/schema.py, connection_labels): the rows of a batch's
    connections are dropped and derived again from their merged rows, so the index holds
    exactly the labels of every open connection whatever order the events came in. :ids is an
    array on PostgreSQL, an expanding list on SQLite."""
    labels = preparer.format_table(tables.connection_labels)
    conns = preparer.format_table(tables.connections)
    if dialect == "postgresql":
        ids = "= ANY(CAST(:ids AS text[]))"
        each = "jsonb_each_text(CAST(c.labels AS jsonb)) AS j"
    else:
        ids = "IN :ids"
        each = "json_each(c.labels) AS j"
    clear = text(f"DELETE FROM {labels} WHERE connection_id {ids}")
    fill = text(
        f"INSERT INTO {labels} (connection_id, key, value, gateway_id) "
        f"SELECT c.connection_id, j.key, j.value, c.gateway_id FROM {conns} AS c, {each} "
        f"WHERE c.connection_id {ids} AND c.labels IS NOT NULL "
        "AND c.disconnected_at_ns IS NULL AND c.gateway_id IS NOT NULL"
    )
    if dialect != "postgresql":
        clear = clear.bindparams(bindparam("ids", expanding=True))
        fill = fill.bindparams(bindparam("ids", expanding=True))
    return LabelStatements(clear, fill)


def database_error(exc: BaseException) -> str:
    """The driver's message, without the statement and parameters SQLAlchemy appends."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return f"database refused: {type(orig or exc).__name__}: {text[0] if text else ''}"


def _pg_array_type(column: Any) -> str:
    if isinstance(column.type, BigInteger):
        return "int8[]"
    if isinstance(column.type, Integer):
        return "int4[]"
    assert isinstance(column.type, String)  # String and Text
    return "text[]"


@functools.cache
def pg_merge(tables: ReadModelTables, preparer: IdentifierPreparer) -> Any:
    """The merging upsert on PostgreSQL: the batch is bound as one array per column and
    unnested into rows (binding 11 parameters per row cost about as much as the database's
    work), tombstoned connections are skipped."""
    connections = tables.connections
    table = preparer.format_table(connections)
    tombstones = preparer.format_table(tables.pruned_connections)
    names = ", ".join(STATE_FIELDS)
    arrays = ", ".join(f"CAST(:{n} AS {_pg_array_type(connections.c[n])})" for n in STATE_FIELDS)
    return text(
        f"INSERT INTO {table} AS existing ({names}) "
        f"SELECT * FROM unnest({arrays}) AS batch ({names}) "
        f"WHERE NOT EXISTS (SELECT 1 FROM {tombstones} AS t "
        "WHERE t.connection_id = batch.connection_id) "
        "ON CONFLICT (connection_id) DO UPDATE SET "
        + _merge_assignments(connections, "existing", ' COLLATE "C"')
    )


@dataclass(frozen=True, slots=True)
class CopyStatements:
    stage: str  # the staging table's name (in pg_temp)
    create: str  # creates the staging table if this session has none
    empty: str
    merge: Any  # the merging upsert from the staging table


@functools.cache
def pg_copy_merge(
    tables: ReadModelTables, preparer: IdentifierPreparer, dialect: Any
) -> CopyStatements:
    """The merging upsert on PostgreSQL by COPY: the batch is copied (binary COPY) into a
    temporary staging table of the same column types, then merged from it by the same SET
    clause as pg_merge(), tombstoned connections skipped, rows taken in connection id order
    (code points, as sorted() orders them) so two writers lock rows in one order. The staging
    table has no constraints: whatever the database refuses, it refuses in the upsert, as it
    would the unnest path's."""
    connections = tables.connections
    table = preparer.format_table(connections)
    tombstones = preparer.format_table(tables.pruned_connections)
    stage = f"conntrack_stage_{connections.name}"
    assert stage.isidentifier()
    names = ", ".join(STATE_FIELDS)
    columns = ", ".join(
        f"{n} {connections.c[n].type.compile(dialect=dialect)}" for n in STATE_FIELDS
    )
    return CopyStatements(
        stage,
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage} ({columns})",
        # TRUNCATE rather than ON COMMIT DELETE ROWS: a transaction may merge more than once
        # (refusals isolated in savepoints, a caller's own transaction).
        f"TRUNCATE pg_temp.{stage}",
        text(
            f"INSERT INTO {table} AS existing ({names}) "
            f"SELECT {names} FROM pg_temp.{stage} AS batch "
            f"WHERE NOT EXISTS (SELECT 1 FROM {tombstones} AS t "
            "WHERE t.connection_id = batch.connection_id) "
            'ORDER BY batch.connection_id COLLATE "C" '
            "ON CONFLICT (connection_id) DO UPDATE SET "
            + _merge_assignments(connections, "existing", ' COLLATE "C"')
        ),
    )


def driver_error(statement: str, exc: Exception) -> Exception:
    """An error of a call made on asyncpg directly, as SQLAlchemy would have raised it from an
    execute(): a refused row as a REFUSALS error, anything else as a DBAPIError (which the
    projector treats as the database being unavailable, and retries)."""
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return IntegrityError(statement, None, exc)
    if isinstance(exc, asyncpg.DataError | OverflowError | ValueError | TypeError):
        # A value the column's type cannot hold (asyncpg's binary encoder, or the server).
        return DataError(statement, None, exc)
    return DBAPIError(statement, None, exc)


@functools.cache
def sqlite_merge(tables: ReadModelTables, preparer: IdentifierPreparer) -> Any:
    """The merging upsert on SQLite, executed once per state (the driver runs one prepared
    statement over all rows)."""
    connections = tables.connections
    table = preparer.format_table(connections)
    tombstones = preparer.format_table(tables.pruned_connections)
    names = ", ".join(STATE_FIELDS)
    values = ", ".join(f":{n}" for n in STATE_FIELDS)
    return text(
        f"INSERT INTO {table} AS existing ({names}) SELECT {values} "
        f"WHERE NOT EXISTS (SELECT 1 FROM {tombstones} WHERE connection_id = :connection_id) "
        "ON CONFLICT (connection_id) DO UPDATE SET "
        + _merge_assignments(connections, "existing", "")
    )


# How a batch's states reach PostgreSQL: "copy" (binary COPY into a staging table, then one
# upsert from it) or "unnest" (one array per column bound to one upsert). Both run the same
# merge; BENCHMARKS.md ("The projector's two ceilings") has what each gave.
