"""The SQL view of the projection: stores fold states and consumer positions together.

Every write of events goes through apply_batch(), which in ONE transaction (1) advances the
stored position of each partition, but only from the position this process expects (a fence: a
process that lost its partitions in a rebalance cannot overwrite its successor's work), then
(2) merges the batch's states into the stored rows. So the read model is always exactly the fold
of the log up to the stored positions, and re-delivered events change nothing.

The merge runs in the database: one `INSERT .. ON CONFLICT DO UPDATE` whose SET clause is
core/fold.py's merge() written in SQL (core/merge_sql.py), so a batch costs one
statement and no read-back of the stored rows. On PostgreSQL the batch first goes into a
session-private staging table by binary COPY (pg_copy_merge), which costs the writing process
about half the CPU per row of binding it as arrays (pg_merge, still selectable for the
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

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import (
    and_,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conntrack.core.fold import ConnectionState, NodeState
from conntrack.core.history_store import (
    NodeHistory,
    archive,
    note_since,
    read_since,
    write_node_history,
)
from conntrack.core.merge_sql import (
    STATE_FIELDS,
    database_error,
    dialect_insert,
    driver_error,
    label_index,
    nodes_merge,
    pg_copy_merge,
    pg_merge,
    sqlite_merge,
)
from conntrack.core.schema import (
    LIVE,
    ReadModelTables,
    row_to_node,
    row_to_state,
    state_to_row,
)

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
            insert = dialect_insert(conn)
            await conn.execute(
                insert(projection_offsets).on_conflict_do_nothing(),
                [{"topic": topic, "partition": p, "next_offset": 0} for p in parts],
            )
            # From the first assignment on, batches keep the nodes' sightings (core/history.py).
            await note_since(conn, self._tables, time.time_ns())
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
        history: NodeHistory | None = None,
    ) -> BatchResult:
        """Atomically move each partition from expected to new offset and merge the states (and
        the nodes' states, and what the batch adds to their history). advances: partition ->
        (expected stored offset, new offset). Raises FencedError, or a REFUSALS error if the
        database will not take a state.

        With on_refused, states are merged in savepoints instead, and a part the database
        refuses is split until the states it refuses are found; those are left out, handed to
        on_refused (which must make them durable elsewhere, or raise to roll everything back),
        and the rest commits with the positions."""
        async with self._engine.begin() as conn:
            return await self.apply_batch_in(
                conn, topic, advances, states, nodes, on_refused, history
            )

    async def apply_batch_in(
        self,
        conn: AsyncConnection,
        topic: str,
        advances: Mapping[int, tuple[int, int]],
        states: Mapping[str, ConnectionState],
        nodes: Mapping[str, NodeState] | None = None,
        on_refused: OnRefused | None = None,
        history: NodeHistory | None = None,
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
        if history:
            await write_node_history(conn, self._tables, history)
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
                refused.update((cid, database_error(exc)) for cid in states)
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
            nodes_merge(self._tables, conn.dialect.identifier_preparer, conn.dialect.name),
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
            statement = pg_merge(self._tables, preparer)
            # Sorted ids: two writers (a rebuild's switch and a straggler) lock rows in one
            # order and cannot deadlock.
            values = [states[cid] for cid in sorted(states)]
            for i in range(0, len(values), ARRAY_CHUNK):
                columns = zip(*values[i : i + ARRAY_CHUNK], strict=True)
                result = await conn.execute(
                    statement, dict(zip(STATE_FIELDS, map(list, columns), strict=True))
                )
                written += result.rowcount
        else:
            # SQLite holds the database's write lock from the fence on: no order needed.
            result = await conn.execute(
                sqlite_merge(self._tables, preparer), [state_to_row(s) for s in states.values()]
            )
            written = result.rowcount
        await self._index_labels(conn, states)
        # Rows skipped for a tombstone are the only ones the upsert neither inserts nor updates.
        return BatchResult(written, len(states) - written)

    async def _index_labels(
        self, conn: AsyncConnection, states: Mapping[str, ConnectionState]
    ) -> None:
        """Bring the label index up to date for the connections whose Connected or
        Disconnected is in the batch (activity changes no label and no openness)."""
        ids = sorted(
            cid
            for cid, s in states.items()
            if s.connected_event_id is not None or s.disconnected_at_ns is not None
        )
        if not ids:
            return
        statements = label_index(self._tables, conn.dialect.identifier_preparer, conn.dialect.name)
        step = CHUNK if conn.dialect.name == "sqlite" else ARRAY_CHUNK
        for i in range(0, len(ids), step):
            part = ids[i : i + step]
            await conn.execute(statements.clear, {"ids": part})
            await conn.execute(statements.fill, {"ids": part})

    async def _copy_merge(
        self, conn: AsyncConnection, states: Mapping[str, ConnectionState]
    ) -> int:
        statements = pg_copy_merge(self._tables, conn.dialect.identifier_preparer, conn.dialect)
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
                columns=STATE_FIELDS,
                # Unsorted: the upsert orders the rows itself, which spares the projector's
                # process a sort of the batch's ids (its one busy core is the bottleneck).
                records=list(states.values()),
            )
        except Exception as exc:
            raise driver_error(step, exc) from exc
        result = await conn.execute(statements.merge)
        return int(result.rowcount)

    async def prune(
        self,
        disconnected_before_ns: int,
        tombstones_before_ns: int | None,
        limit: int = CHUNK,
        *,
        keep_history: bool = False,
    ) -> PruneResult:
        """Delete up to `limit` rows of connections disconnected before disconnected_before_ns,
        leaving a tombstone for each (and, with keep_history, moving them into the history:
        core/history_store.py), and up to `limit` tombstones of disconnects before
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
                        .returning(*connections.columns)
                    )
                ).all()
                if deleted and keep_history:
                    await archive(conn, self._tables, (row_to_state(r._mapping) for r in deleted))
                if deleted:
                    insert = dialect_insert(conn)
                    await conn.execute(
                        insert(pruned_connections).on_conflict_do_nothing(),
                        [
                            {
                                "connection_id": r.connection_id,
                                "disconnected_at_ns": r.disconnected_at_ns,
                            }
                            for r in deleted
                        ],
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

    async def history_since(self) -> int | None:
        """Since when node sightings are kept (core/history_store.py, note_since)."""
        async with self._engine.connect() as conn:
            return await read_since(conn, self._tables)

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
