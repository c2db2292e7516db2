"""The SQL view of the projection: stores fold states and consumer positions together.

Every write of events goes through apply_batch(), which in ONE transaction (1) advances the
stored position of each partition, but only from the position this process expects (a fence: a
process that lost its partitions in a rebalance cannot overwrite its successor's work), then
(2) merges the batch's states into the stored rows. So the read model is always exactly the fold
of the log up to the stored positions, and re-delivered events change nothing.

Retention (prune()) deletes rows of connections that disconnected long ago and leaves a
tombstone per row; apply_batch() drops batch states of tombstoned connections, so a late
duplicate event cannot bring a pruned connection back half-empty. Row locks (SELECT .. FOR
UPDATE on PostgreSQL; SQLite has one writer at a time anyway) order a prune and a batch that
touch the same connection, whichever process runs them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    RowMapping,
    String,
    Table,
    and_,
    any_,
    bindparam,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.compiler import IdentifierPreparer

from connection_tracker.schema import LIVE, ReadModelTables
from projector.fold import ConnectionState, merge

_STATE_FIELDS = tuple(f.name for f in fields(ConnectionState))
# Keeps IN (...) lists and multi-row VALUES (11 parameters a row) well inside every backend's
# parameter limit (SQLite 32766, PostgreSQL 32767).
CHUNK = 500
# On PostgreSQL the ids and columns are bound as arrays (no parameter limit): fewer, larger
# round trips per batch (measured: about 15% more events/s than chunks of 500).
ARRAY_CHUNK = 5000


class FencedError(RuntimeError):
    """The stored position of a partition is not where this process expected it: another
    consumer has applied events for it since, or a rebuild switched in a generation that is
    further on (audit/rebuild.py). The batch was rolled back."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    written: int  # connection rows inserted or updated
    suppressed: int  # batch states dropped because their connection was pruned (tombstoned)


@dataclass(frozen=True, slots=True)
class PruneResult:
    pruned: int  # connection rows deleted (each left a tombstone)
    tombstones_expired: int


def _dialect_insert(conn: AsyncConnection) -> Callable[..., Any]:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


def _row(state: ConnectionState) -> dict[str, Any]:
    return {name: getattr(state, name) for name in _STATE_FIELDS}


@functools.cache
def _upsert(insert: Callable[..., Any], connections: Table) -> Any:
    stmt = insert(connections)
    return stmt.on_conflict_do_update(
        index_elements=[connections.c.connection_id],
        set_={n: stmt.excluded[n] for n in _STATE_FIELDS if n != "connection_id"},
    ).returning(connections.c.connection_id)


@functools.cache
def _read_back(connections: Table, pruned_connections: Table, postgres: bool) -> tuple[Any, Any]:
    """The merge's two reads of a chunk's ids (bound as "ids"): the stored rows, locked, in
    _STATE_FIELDS order, and the tombstoned ids. On PostgreSQL the ids are ONE array parameter:
    an expanding `IN (..)` is re-rendered with a cast per id on every execution, which cost
    about a fifth of a batch's time."""
    if postgres:
        ids: Any = any_(bindparam("ids", type_=postgresql.ARRAY(String())))
        stored_match = connections.c.connection_id == ids
        tombstone_match = pruned_connections.c.connection_id == ids
    else:
        stored_match = connections.c.connection_id.in_(bindparam("ids", expanding=True))
        tombstone_match = pruned_connections.c.connection_id.in_(bindparam("ids", expanding=True))
    stored = (
        select(*(connections.c[n] for n in _STATE_FIELDS)).where(stored_match).with_for_update()
    )
    tombstoned = select(pruned_connections.c.connection_id).where(tombstone_match)
    return stored, tombstoned


def _pg_array_type(column: Any) -> str:
    if isinstance(column.type, BigInteger):
        return "int8[]"
    if isinstance(column.type, Integer):
        return "int4[]"
    assert isinstance(column.type, String)  # String and Text
    return "text[]"


@functools.cache
def _pg_upsert(connections: Table, preparer: IdentifierPreparer) -> Any:
    """The upsert on PostgreSQL with one array parameter per column, unnested into rows:
    SQLAlchemy binds 11 arrays instead of rendering and binding 11 parameters per row (its
    "insertmanyvalues" bookkeeping cost about as much as the database's work)."""
    quote = preparer.quote
    table = preparer.format_table(connections)
    names = ", ".join(quote(n) for n in _STATE_FIELDS)
    arrays = ", ".join(f"CAST(:{n} AS {_pg_array_type(connections.c[n])})" for n in _STATE_FIELDS)
    updates = ", ".join(
        f"{quote(n)} = EXCLUDED.{quote(n)}" for n in _STATE_FIELDS if n != "connection_id"
    )
    return text(
        f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays}) "
        f"ON CONFLICT ({quote('connection_id')}) DO UPDATE SET {updates}"
    )


def row_to_state(row: RowMapping | Mapping[str, Any]) -> ConnectionState:
    return ConnectionState(**{name: row[name] for name in _STATE_FIELDS})


class ProjectionStore:
    def __init__(self, engine: AsyncEngine, tables: ReadModelTables = LIVE) -> None:
        """tables: the live read model by default; a rebuild writes its shadow generation
        through the very same code (audit/rebuild.py)."""
        self._engine = engine
        self._tables = tables

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
    ) -> BatchResult:
        """Atomically move each partition from expected to new offset and merge the states.
        advances: partition -> (expected stored offset, new offset). Raises FencedError."""
        async with self._engine.begin() as conn:
            return await self.apply_batch_in(conn, topic, advances, states)

    async def apply_batch_in(
        self,
        conn: AsyncConnection,
        topic: str,
        advances: Mapping[int, tuple[int, int]],
        states: Mapping[str, ConnectionState],
    ) -> BatchResult:
        """apply_batch() inside the caller's transaction (a rebuild's switch folds its last
        events in the same transaction that swaps the generations)."""
        projection_offsets = self._tables.projection_offsets
        if conn.dialect.name == "postgresql":
            # The driver prepares statements, and after five runs PostgreSQL may switch to a
            # generic plan in which `IN ($1 .. $500)` is a linear search per row instead of
            # a hash: the batch's SELECTs became 30x slower. Batches are few and large, so
            # planning each statement for its actual values is the better trade.
            await conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        # The fence comes first: its row locks (and SQLite's write lock) are held for the
        # whole transaction, so the merge below never races the partition's next owner.
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
        if not states:
            return BatchResult(0, 0)
        return await self._merge_states(conn, states)

    async def _merge_states(
        self, conn: AsyncConnection, states: Mapping[str, ConnectionState]
    ) -> BatchResult:
        connections, pruned_connections = self._tables.connections, self._tables.pruned_connections
        insert = _dialect_insert(conn)
        ids = sorted(states)  # a fixed lock order: two writers cannot deadlock on rows
        written = suppressed = 0
        postgres = conn.dialect.name == "postgresql"
        read_stored, read_tombstoned = _read_back(connections, pruned_connections, postgres)
        chunk_size = ARRAY_CHUNK if postgres else CHUNK
        for i in range(0, len(ids), chunk_size):
            chunk = ids[i : i + chunk_size]
            merged = {cid: states[cid] for cid in chunk}
            # Lock the stored rows before looking for tombstones: a concurrent prune either
            # waits for this transaction or has committed its tombstone before we read it.
            for row in await conn.execute(read_stored, {"ids": chunk}):
                stored = ConnectionState(*row)
                merged[stored.connection_id] = merge(stored, merged[stored.connection_id])
            tombstoned = await conn.execute(read_tombstoned, {"ids": chunk})
            for (cid,) in tombstoned:
                del merged[cid]
                suppressed += 1
            if not merged:
                continue
            # The rows were merged above under the partition fence and row locks, so the stored
            # row is simply replaced.
            if postgres:
                values = list(merged.values())
                await conn.execute(
                    _pg_upsert(connections, conn.dialect.identifier_preparer),
                    {n: [getattr(s, n) for s in values] for n in _STATE_FIELDS},
                )
            else:
                # Executed with a list of rows and RETURNING, SQLAlchemy sends multi-row
                # INSERT .. VALUES (..), (..) .. ON CONFLICT DO UPDATE statements
                # ("insertmanyvalues") from one cached compilation; .values([...]) would
                # recompile a 5500-parameter statement for every chunk, which cost most of a
                # batch's time.
                await conn.execute(_upsert(insert, connections), [_row(s) for s in merged.values()])
            written += len(merged)
        return BatchResult(written, suppressed)

    async def prune(
        self, disconnected_before_ns: int, tombstones_before_ns: int | None, limit: int = CHUNK
    ) -> PruneResult:
        """Delete up to `limit` rows of connections disconnected before disconnected_before_ns,
        leaving a tombstone for each, and up to `limit` tombstones of disconnects before
        tombstones_before_ns (None keeps tombstones). One small transaction; call again while
        it returns `limit` of either."""
        connections, pruned_connections = self._tables.connections, self._tables.pruned_connections
        async with self._engine.begin() as conn:
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
