"""The SQL view of the projection: stores fold states and consumer positions together.

Every write goes through apply_batch(), which in ONE transaction (1) advances the stored
position of each partition, but only from the position this process expects (a fence: a
process that lost its partitions in a rebalance cannot overwrite its successor's work), then
(2) merges the batch's states into the stored rows. So the read model is always exactly the fold
of the log up to the stored positions, and re-delivered events change nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, fields
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from connection_tracker.schema import connections, projection_offsets
from projector.fold import ConnectionState, merge

_STATE_FIELDS = tuple(f.name for f in fields(ConnectionState))
# Keeps IN (...) lists and multi-row VALUES well inside every backend's parameter limits.
_CHUNK = 500


class FencedError(RuntimeError):
    """The stored position of a partition is not where this process expected it: another
    consumer has applied events for it since. The batch was rolled back."""


def _dialect_insert(conn: AsyncConnection) -> Callable[..., Any]:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


def row_to_state(row: Mapping[str, Any]) -> ConnectionState:
    return ConnectionState(**{name: row[name] for name in _STATE_FIELDS})


class ProjectionStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def positions(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """Stored next offsets of these partitions, creating 0 for ones never seen (a position
        before the log start makes the consumer reset to the earliest offset it still has)."""
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
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(projection_offsets))
            return {(r.topic, int(r.partition)): int(r.next_offset) for r in rows}

    async def apply_batch(
        self,
        topic: str,
        advances: Mapping[int, tuple[int, int]],
        states: Mapping[str, ConnectionState],
    ) -> None:
        """Atomically move each partition from expected to new offset and merge the states.
        advances: partition -> (expected stored offset, new offset). Raises FencedError."""
        async with self._engine.begin() as conn:
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
                        "another projector has applied it"
                    )
            if states:
                await self._merge_states(conn, states)

    async def _merge_states(
        self, conn: AsyncConnection, states: Mapping[str, ConnectionState]
    ) -> None:
        ids = list(states)
        merged = dict(states)
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            rows = await conn.execute(
                select(connections).where(connections.c.connection_id.in_(chunk))
            )
            for row in rows.mappings():
                stored = row_to_state(row)
                merged[stored.connection_id] = merge(stored, merged[stored.connection_id])
        insert = _dialect_insert(conn)
        values = [asdict(s) for s in merged.values()]
        # One multi-row INSERT .. ON CONFLICT DO UPDATE per chunk: the rows were merged above
        # under the partition fence, so the stored row is simply replaced.
        for i in range(0, len(values), _CHUNK):
            stmt = insert(connections).values(values[i : i + _CHUNK])
            stmt = stmt.on_conflict_do_update(
                index_elements=[connections.c.connection_id],
                set_={n: stmt.excluded[n] for n in _STATE_FIELDS if n != "connection_id"},
            )
            await conn.execute(stmt)

    async def get(self, connection_id: str) -> ConnectionState | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(connections).where(connections.c.connection_id == connection_id)
                )
            ).mappings().first()
        return None if row is None else row_to_state(row)

    async def all_states(self) -> dict[str, ConnectionState]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(connections))
            return {r["connection_id"]: row_to_state(r) for r in rows.mappings()}
