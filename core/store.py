"""The SQL view of the projection: stores fold states and consumer positions together.

Every write of events goes through apply_batch(), which in ONE transaction (1) advances the
stored position of each partition, but only from the position this process expects (a fence: a
process that lost its partitions in a rebalance cannot overwrite its successor's work), then
(2) merges the batch's states into the stored rows. So the read model is always exactly the fold
of the log up to the stored positions, and re-delivered events change nothing.

The merge runs in the database: one `INSERT .. ON CONFLICT DO UPDATE` whose SET clause is
core/fold.py's merge() written in SQL (_merge_assignments), so a batch costs one
statement and no read-back of the stored rows. On PostgreSQL the batch first goes into a
session-private staging table by binary COPY (_pg_copy_merge), which costs the writing process
about half the CPU per row of binding it as arrays (_pg_merge, still selectable for the
benchmark: BENCHMARKS.md, 1d). tests/integration/test_store.py checks the SQL
merge against merge() on random pairs of states, ties included, on every backend.

Retention (prune()) deletes rows of connections that disconnected long ago and leaves a
tombstone per row; the upsert skips batch states of tombstoned connections, so a late duplicate
event cannot bring a pruned connection back half-empty. A prune first locks every stored
position (the rows the batches' fences update), so prunes and batches never overlap: a batch
that starts after a prune sees its tombstones, and a prune that starts after a batch sees its
rows.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Table,
    and_,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.compiler import IdentifierPreparer

from conntrack.core.fold import ConnectionState, NodeState
from conntrack.core.schema import (
    LIVE,
    ReadModelTables,
    row_to_node,
    row_to_state,
    state_to_row,
)

_STATE_FIELDS = ConnectionState._fields
# Rows per prune transaction: keeps IN (...) lists well inside every backend's parameter limit
# (SQLite 32766, PostgreSQL 32767) and prunes short.
CHUNK = 500
# On PostgreSQL a batch's columns are bound as arrays (no parameter limit); this only bounds
# the size of one statement's message when a batch is very large.
ARRAY_CHUNK = 20_000


class FencedError(RuntimeError):
    """The stored position of a partition is not where this process expected it: another
    consumer has applied events for it since, or a rebuild switched in a generation that is
    further on (audit/rebuild.py). The batch was rolled back."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    written: int  # connection rows inserted or updated
    suppressed: int  # batch states dropped because their connection was pruned (tombstoned)
    refused: int = 0  # batch states the database refused (isolated and handed to on_refused)


# What a database says about one row it will not take (a constraint, a value out of range), as
# opposed to being unavailable: retrying the same row cannot help.
REFUSALS: tuple[type[BaseException], ...] = (IntegrityError, DataError)

# on_refused(connection id -> the database's error), awaited before the batch commits.
OnRefused = Callable[[dict[str, str]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PruneResult:
    pruned: int  # connection rows deleted (each left a tombstone)
    tombstones_expired: int


def _dialect_insert(conn: AsyncConnection) -> Callable[..., Any]:
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
)
_CONNECTED_FIELDS = (
    "gateway_id",
    "source_ip",
    "user_agent",
    "connected_at_ns",
    "connected_event_id",
    "node_id",
    "node_incarnation",
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
    assert all(n.isidentifier() and n.islower() for n in _STATE_FIELDS)
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
    assert {n for n in _STATE_FIELDS if n != "connection_id"} == {
        s.split(" = ", 1)[0] for s in sets
    }
    return ", ".join(sets)


@functools.cache
def _nodes_merge(tables: ReadModelTables, preparer: IdentifierPreparer, dialect: str) -> Any:
    """conntrack.core.fold.merge_nodes() in SQL: a newer incarnation takes the row; within
    one, the earliest start, the latest sighting and the least gateway id (by code point)."""
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
            ]
        )
    )


def _database_error(exc: BaseException) -> str:
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
def _pg_merge(tables: ReadModelTables, preparer: IdentifierPreparer) -> Any:
    """The merging upsert on PostgreSQL: the batch is bound as one array per column and
    unnested into rows (binding 11 parameters per row cost about as much as the database's
    work), tombstoned connections are skipped."""
    connections = tables.connections
    table = preparer.format_table(connections)
    tombstones = preparer.format_table(tables.pruned_connections)
    names = ", ".join(_STATE_FIELDS)
    arrays = ", ".join(f"CAST(:{n} AS {_pg_array_type(connections.c[n])})" for n in _STATE_FIELDS)
    return text(
        f"INSERT INTO {table} AS existing ({names}) "
        f"SELECT * FROM unnest({arrays}) AS batch ({names}) "
        f"WHERE NOT EXISTS (SELECT 1 FROM {tombstones} AS t "
        "WHERE t.connection_id = batch.connection_id) "
        "ON CONFLICT (connection_id) DO UPDATE SET "
        + _merge_assignments(connections, "existing", ' COLLATE "C"')
    )


@dataclass(frozen=True, slots=True)
class _CopyStatements:
    stage: str  # the staging table's name (in pg_temp)
    create: str  # creates the staging table if this session has none
    empty: str
    merge: Any  # the merging upsert from the staging table


@functools.cache
def _pg_copy_merge(
    tables: ReadModelTables, preparer: IdentifierPreparer, dialect: Any
) -> _CopyStatements:
    """The merging upsert on PostgreSQL by COPY: the batch is copied (binary COPY) into a
    temporary staging table of the same column types, then merged from it by the same SET
    clause as _pg_merge(), tombstoned connections skipped, rows taken in connection id order
    (code points, as sorted() orders them) so two writers lock rows in one order. The staging
    table has no constraints: whatever the database refuses, it refuses in the upsert, as it
    would the unnest path's."""
    connections = tables.connections
    table = preparer.format_table(connections)
    tombstones = preparer.format_table(tables.pruned_connections)
    stage = f"conntrack_stage_{connections.name}"
    assert stage.isidentifier()
    names = ", ".join(_STATE_FIELDS)
    columns = ", ".join(
        f"{n} {connections.c[n].type.compile(dialect=dialect)}" for n in _STATE_FIELDS
    )
    return _CopyStatements(
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


def _driver_error(statement: str, exc: Exception) -> Exception:
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
def _sqlite_merge(tables: ReadModelTables, preparer: IdentifierPreparer) -> Any:
    """The merging upsert on SQLite, executed once per state (the driver runs one prepared
    statement over all rows)."""
    connections = tables.connections
    table = preparer.format_table(connections)
    tombstones = preparer.format_table(tables.pruned_connections)
    names = ", ".join(_STATE_FIELDS)
    values = ", ".join(f":{n}" for n in _STATE_FIELDS)
    return text(
        f"INSERT INTO {table} AS existing ({names}) SELECT {values} "
        f"WHERE NOT EXISTS (SELECT 1 FROM {tombstones} WHERE connection_id = :connection_id) "
        "ON CONFLICT (connection_id) DO UPDATE SET "
        + _merge_assignments(connections, "existing", "")
    )


# How a batch's states reach PostgreSQL: "copy" (binary COPY into a staging table, then one
# upsert from it) or "unnest" (one array per column bound to one upsert). Both run the same
# merge; BENCHMARKS.md ("The projector's two ceilings") has what each gave.
PG_BULK_PATHS = ("copy", "unnest")


class ProjectionStore:
    def __init__(
        self, engine: AsyncEngine, tables: ReadModelTables = LIVE, *, pg_bulk: str = "copy"
    ) -> None:
        """tables: the live read model by default; a rebuild writes its shadow generation
        through the very same code (audit/rebuild.py). pg_bulk: PG_BULK_PATHS (the benchmark
        compares them; everything else keeps the default)."""
        if pg_bulk not in PG_BULK_PATHS:
            raise ValueError(f"pg_bulk must be one of {PG_BULK_PATHS}, not {pg_bulk!r}")
        self._engine = engine
        self._tables = tables
        self._pg_copy = pg_bulk == "copy"

    @property
    def tables(self) -> ReadModelTables:
        return self._tables

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def positions(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """Stored next offsets of these partitions, creating 0 for ones never seen (a position
        before the log start makes the consumer reset to the earliest offset it still has)."""
        projection_offsets = self._tables.projection_offsets
        parts = sorted(set(partitions))
        if not parts:
            return {}
        async with self._engine.begin() as conn:
            insert = _dialect_insert(conn)
            await conn.execute(
                insert(projection_offsets).on_conflict_do_nothing(),
                [{"topic": topic, "partition": p, "next_offset": 0} for p in parts],
            )
            rows = await conn.execute(
                select(projection_offsets.c.partition, projection_offsets.c.next_offset).where(
                    projection_offsets.c.topic == topic,
                    projection_offsets.c.partition.in_(parts),
                )
            )
            return {int(p): int(o) for p, o in rows}

    async def all_positions(self) -> dict[tuple[str, int], int]:
        projection_offsets = self._tables.projection_offsets
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(projection_offsets))
            return {(r.topic, int(r.partition)): int(r.next_offset) for r in rows}

    async def apply_batch(
        self,
        topic: str,
        advances: Mapping[int, tuple[int, int]],
        states: Mapping[str, ConnectionState],
        nodes: Mapping[str, NodeState] | None = None,
        on_refused: OnRefused | None = None,
    ) -> BatchResult:
        """Atomically move each partition from expected to new offset and merge the states (and
        the nodes' states). advances: partition -> (expected stored offset, new offset). Raises
        FencedError, or a REFUSALS error if the database will not take a state.

        With on_refused, states are merged in savepoints instead, and a part the database
        refuses is split until the states it refuses are found; those are left out, handed to
        on_refused (which must make them durable elsewhere, or raise to roll everything back),
        and the rest commits with the positions."""
        async with self._engine.begin() as conn:
            return await self.apply_batch_in(conn, topic, advances, states, nodes, on_refused)

    async def apply_batch_in(
        self,
        conn: AsyncConnection,
        topic: str,
        advances: Mapping[int, tuple[int, int]],
        states: Mapping[str, ConnectionState],
        nodes: Mapping[str, NodeState] | None = None,
        on_refused: OnRefused | None = None,
    ) -> BatchResult:
        """apply_batch() inside the caller's transaction (a rebuild's switch folds its last
        events in the same transaction that swaps the generations)."""
        projection_offsets = self._tables.projection_offsets
        # The fence comes first: its row locks (and SQLite's write lock) are held for the
        # whole transaction, so the merge below never races the partition's next owner, nor a
        # prune (which takes the same locks first).
        for partition, (expected, new) in sorted(advances.items()):
            result = await conn.execute(
                update(projection_offsets)
                .where(
                    and_(
                        projection_offsets.c.topic == topic,
                        projection_offsets.c.partition == partition,
                        projection_offsets.c.next_offset == expected,
                    )
                )
                .values(next_offset=new)
            )
            if result.rowcount != 1:
                raise FencedError(
                    f"{topic}[{partition}] is no longer at offset {expected}; "
                    "another projector (or a rebuild's switch) has moved it"
                )
        if nodes:
            await self._merge_nodes(conn, nodes)
        if not states:
            return BatchResult(0, 0)
        if on_refused is None:
            return await self._merge_states(conn, states)
        refused: dict[str, str] = {}
        merged = await self._merge_isolating(conn, dict(states), refused)
        if refused:
            await on_refused(refused)
        return BatchResult(merged.written, merged.suppressed, len(refused))

    async def _merge_isolating(
        self, conn: AsyncConnection, states: dict[str, ConnectionState], refused: dict[str, str]
    ) -> BatchResult:
        """_merge_states() in a savepoint; a refused part is halved until the refused states
        are single ones (collected in `refused`)."""
        try:
            async with conn.begin_nested():
                return await self._merge_states(conn, states)
        except REFUSALS as exc:
            if len(states) == 1:
                refused.update((cid, _database_error(exc)) for cid in states)
                return BatchResult(0, 0)
        ids = sorted(states)
        halves = (ids[: len(ids) // 2], ids[len(ids) // 2 :])
        written = suppressed = 0
        for half in halves:
            part = await self._merge_isolating(conn, {c: states[c] for c in half}, refused)
            written += part.written
            suppressed += part.suppressed
        return BatchResult(written, suppressed)

    async def _merge_nodes(self, conn: AsyncConnection, nodes: Mapping[str, NodeState]) -> None:
        # Sorted: two writers lock node rows in one order and cannot deadlock.
        await conn.execute(
            _nodes_merge(self._tables, conn.dialect.identifier_preparer, conn.dialect.name),
            [node._asdict() for _, node in sorted(nodes.items())],
        )

    async def nodes(self) -> dict[str, NodeState]:
        nodes = self._tables.nodes
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(nodes))
            return {r["node_id"]: row_to_node(r) for r in rows.mappings()}

    async def _merge_states(
        self, conn: AsyncConnection, states: Mapping[str, ConnectionState]
    ) -> BatchResult:
        preparer = conn.dialect.identifier_preparer
        written = 0
        if conn.dialect.name == "postgresql" and self._pg_copy:
            written = await self._copy_merge(conn, states)
        elif conn.dialect.name == "postgresql":
            statement = _pg_merge(self._tables, preparer)
            # Sorted ids: two writers (a rebuild's switch and a straggler) lock rows in one
            # order and cannot deadlock.
            values = [states[cid] for cid in sorted(states)]
            for i in range(0, len(values), ARRAY_CHUNK):
                columns = zip(*values[i : i + ARRAY_CHUNK], strict=True)
                result = await conn.execute(
                    statement, dict(zip(_STATE_FIELDS, map(list, columns), strict=True))
                )
                written += result.rowcount
        else:
            # SQLite holds the database's write lock from the fence on: no order needed.
            result = await conn.execute(
                _sqlite_merge(self._tables, preparer), [state_to_row(s) for s in states.values()]
            )
            written = result.rowcount
        # Rows skipped for a tombstone are the only ones the upsert neither inserts nor updates.
        return BatchResult(written, len(states) - written)

    async def _copy_merge(
        self, conn: AsyncConnection, states: Mapping[str, ConnectionState]
    ) -> int:
        statements = _pg_copy_merge(self._tables, conn.dialect.identifier_preparer, conn.dialect)
        # Through SQLAlchemy, which begins its transaction on the driver's connection if no
        # statement has yet (its errors wrapped as every other statement's are).
        await conn.exec_driver_sql(statements.create)
        await conn.exec_driver_sql(statements.empty)
        # The COPY on the driver's own connection, inside that transaction: it commits or rolls
        # back with the positions.
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        step = f"COPY pg_temp.{statements.stage} FROM STDIN"
        try:
            await driver.copy_records_to_table(
                statements.stage,
                schema_name="pg_temp",
                columns=_STATE_FIELDS,
                # Unsorted: the upsert orders the rows itself, which spares the projector's
                # process a sort of the batch's ids (its one busy core is the bottleneck).
                records=list(states.values()),
            )
        except Exception as exc:
            raise _driver_error(step, exc) from exc
        result = await conn.execute(statements.merge)
        return int(result.rowcount)

    async def prune(
        self, disconnected_before_ns: int, tombstones_before_ns: int | None, limit: int = CHUNK
    ) -> PruneResult:
        """Delete up to `limit` rows of connections disconnected before disconnected_before_ns,
        leaving a tombstone for each, and up to `limit` tombstones of disconnects before
        tombstones_before_ns (None keeps tombstones). One small transaction; call again while
        it returns `limit` of either."""
        connections, pruned_connections = self._tables.connections, self._tables.pruned_connections
        projection_offsets = self._tables.projection_offsets
        async with self._engine.begin() as conn:
            # Every stored position, locked in the fences' order (no deadlock): batches that
            # hold any of them finish first, later ones wait for this prune's commit and then
            # see its tombstones. (On SQLite the write lock does the same.)
            await conn.execute(
                select(projection_offsets.c.topic)
                .order_by(projection_offsets.c.topic, projection_offsets.c.partition)
                .with_for_update()
            )
            victims = [
                cid
                for (cid,) in await conn.execute(
                    select(connections.c.connection_id)
                    .where(connections.c.disconnected_at_ns < disconnected_before_ns)
                    .order_by(connections.c.disconnected_at_ns)
                    .limit(limit)
                )
            ]
            pruned = 0
            if victims:
                # The condition is checked again at delete time: a batch may have changed the
                # row since it was selected.
                deleted = (
                    await conn.execute(
                        delete(connections)
                        .where(
                            connections.c.connection_id.in_(victims),
                            connections.c.disconnected_at_ns < disconnected_before_ns,
                        )
                        .returning(connections.c.connection_id, connections.c.disconnected_at_ns)
                    )
                ).all()
                if deleted:
                    insert = _dialect_insert(conn)
                    await conn.execute(
                        insert(pruned_connections).on_conflict_do_nothing(),
                        [{"connection_id": c, "disconnected_at_ns": d} for c, d in deleted],
                    )
                pruned = len(deleted)
            expired = 0
            if tombstones_before_ns is not None:
                old = select(pruned_connections.c.connection_id).where(
                    pruned_connections.c.disconnected_at_ns < tombstones_before_ns
                )
                result = await conn.execute(
                    delete(pruned_connections).where(
                        pruned_connections.c.connection_id.in_(old.limit(limit))
                    )
                )
                expired = max(result.rowcount, 0)
            return PruneResult(pruned, expired)

    async def get(self, connection_id: str) -> ConnectionState | None:
        connections = self._tables.connections
        async with self._engine.connect() as conn:
            row = (
                (
                    await conn.execute(
                        select(connections).where(connections.c.connection_id == connection_id)
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else row_to_state(row)

    async def all_states(self) -> dict[str, ConnectionState]:
        connections = self._tables.connections
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(connections))
            return {r["connection_id"]: row_to_state(r) for r in rows.mappings()}

    async def tombstones(self) -> dict[str, int]:
        pruned_connections = self._tables.pruned_connections
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(pruned_connections))
            return {r.connection_id: int(r.disconnected_at_ns) for r in rows}

    async def count(self) -> int:
        connections = self._tables.connections
        async with self._engine.connect() as conn:
            return int(
                (await conn.execute(select(func.count()).select_from(connections))).scalar_one()
            )
