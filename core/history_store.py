"""The SQL view of presence in time (core/history.py is its pure part): the node sightings and
fences a batch writes in its transaction, the closed connections retention archives instead of
deleting, and the expiry of what is older than the kept history.

On PostgreSQL connection_history is partitioned by range of bucket, a partition a day (24
buckets): archive() creates a day's partition when its first row arrives, and expire() drops
whole partitions, so expiring a day costs a catalog change rather than a delete of its rows.
SQLite keeps one table and deletes a chunk at a time.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import and_, delete, func, insert, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conntrack.core.fold import ConnectionState
from conntrack.core.history import (
    BUCKETS_PER_DAY,
    DAY_NS,
    Sighting,
    bucket_of,
    buckets_of,
    coalesce,
)
from conntrack.core.merge_sql import dialect_insert
from conntrack.core.schema import ReadModelTables, state_to_row

# History rows deleted per transaction on SQLite.
EXPIRE_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class NodeHistory:
    """What one batch adds to the nodes' history: its sighting intervals (merged across
    gap_ns) and its fences, (node, incarnation) -> earliest decision."""

    gap_ns: int
    sightings: list[Sighting] = field(default_factory=list)
    fences: dict[tuple[str, int], int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.sightings or self.fences)


async def write_node_history(
    conn: AsyncConnection, tables: ReadModelTables, history: NodeHistory
) -> None:
    """Merge a batch's sightings into the stored intervals, and its fences into the stored
    ones, inside the batch's transaction (a node's events are all on its key's partition, so
    one writer at a time merges a node's intervals)."""
    s = tables.node_sightings.c
    for new in history.sightings:
        near = await conn.execute(
            select(s.node_id, s.incarnation, s.first_seen_ns, s.last_seen_ns).where(
                s.node_id == new.node_id,
                s.incarnation == new.incarnation,
                s.first_seen_ns <= new.last_seen_ns + history.gap_ns,
                s.last_seen_ns >= new.first_seen_ns - history.gap_ns,
            )
        )
        joined, hull = coalesce([Sighting(*r) for r in near], new, history.gap_ns)
        if joined == [hull]:
            continue
        for old in joined:
            await conn.execute(
                delete(tables.node_sightings).where(
                    s.node_id == old.node_id,
                    s.incarnation == old.incarnation,
                    s.first_seen_ns == old.first_seen_ns,
                )
            )
        await conn.execute(insert(tables.node_sightings).values(hull._asdict()))
    if history.fences:
        fences = tables.node_fences
        upsert = dialect_insert(conn)(fences)
        await conn.execute(
            upsert.on_conflict_do_update(
                index_elements=[fences.c.node_id, fences.c.incarnation],
                set_={"fenced_at_ns": func.min(fences.c.fenced_at_ns, upsert.excluded.fenced_at_ns)}
                if conn.dialect.name == "sqlite"
                else {
                    "fenced_at_ns": func.least(fences.c.fenced_at_ns, upsert.excluded.fenced_at_ns)
                },
            ),
            [
                {"node_id": n, "incarnation": i, "fenced_at_ns": at}
                for (n, i), at in sorted(history.fences.items())
            ],
        )


async def note_since(conn: AsyncConnection, tables: ReadModelTables, now_ns: int) -> None:
    """Record since when node sightings are kept, unless it already is: from the log's start
    (0) for a read model that has applied nothing yet (it will fold the whole log, sightings and
    all: a new database, a rebuild's shadow), else from now (one migrated to keep history)."""
    offsets = tables.projection_offsets
    applied = await conn.execute(select(offsets.c.topic).where(offsets.c.next_offset > 0).limit(1))
    since = now_ns if applied.first() is not None else 0
    await conn.execute(
        dialect_insert(conn)(tables.history_since)
        .values(id=1, since_ns=since)
        .on_conflict_do_nothing()
    )


def history_rows(states: Iterable[ConnectionState]) -> list[dict[str, object]]:
    """A closed connection's history rows: one per hour its interval touches."""
    rows: list[dict[str, object]] = []
    for state in states:
        assert state.connected_at_ns is not None
        assert state.disconnected_at_ns is not None
        hours = buckets_of(state.connected_at_ns, state.disconnected_at_ns)
        row = state_to_row(state)
        rows.extend({**row, "bucket": b, "final": int(b == hours[-1])} for b in hours)
    return rows


async def archive(
    conn: AsyncConnection, tables: ReadModelTables, states: Iterable[ConnectionState]
) -> None:
    """Add closed connections (connected and disconnected) to the history, inside the caller's
    transaction. A state that never connected has no interval and is not kept."""
    rows = history_rows(
        s for s in states if s.connected_at_ns is not None and s.disconnected_at_ns is not None
    )
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        for day in sorted({int(r["bucket"]) // BUCKETS_PER_DAY for r in rows}):  # type: ignore[call-overload]
            await _ensure_partition(conn, tables.connection_history.name, day)
    await conn.execute(
        dialect_insert(conn)(tables.connection_history).on_conflict_do_nothing(), rows
    )


_PARTITIONS = text(
    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i "
    "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(:parent)"
)


def _bound(day: int) -> str:
    return f"FOR VALUES FROM ('{day * BUCKETS_PER_DAY}') TO ('{(day + 1) * BUCKETS_PER_DAY}')"


async def _partitions(conn: AsyncConnection, parent: str) -> dict[str, int]:
    """A partitioned history's partitions: name -> the day it holds."""
    out: dict[str, int] = {}
    for name, bound in await conn.execute(_PARTITIONS, {"parent": parent}):
        first = int(str(bound).split("'")[1])
        out[str(name)] = first // BUCKETS_PER_DAY
    return out


async def _ensure_partition(conn: AsyncConnection, parent: str, day: int) -> None:
    if day in (await _partitions(conn, parent)).values():
        return
    q = conn.dialect.identifier_preparer.quote
    name = f"{parent}_d{day}"
    taken = (await conn.execute(text("SELECT to_regclass(:n)"), {"n": name})).scalar()
    if taken is not None:  # a retired generation's partition keeps its name (audit/rebuild.py)
        name = f"{name}_{secrets.token_hex(3)}"
    await conn.execute(text(f"CREATE TABLE {q(name)} PARTITION OF {q(parent)} {_bound(day)}"))


@dataclass(frozen=True, slots=True)
class Expired:
    rows: int  # history rows deleted (SQLite) or held by the dropped partitions (PostgreSQL)
    partitions: int
    sightings: int


async def expire(
    engine: AsyncEngine, tables: ReadModelTables, horizon_ns: int, lease_ns: int
) -> Expired:
    """Forget what answers at or after horizon_ns (with a lease of at most lease_ns) do not
    need: the history's hours wholly before it (whole days on PostgreSQL), and node sightings
    whose lease ran out before it and that a later interval of the same node, of the same or a
    newer incarnation, begun by then, outdoes. A node's latest interval is always kept: it
    still says which incarnation the node was in."""
    h = tables.connection_history
    rows = partitions = 0
    if engine.dialect.name == "postgresql":
        async with engine.begin() as conn:
            q = conn.dialect.identifier_preparer.quote
            for name, day in sorted((await _partitions(conn, h.name)).items()):
                if (day + 1) * DAY_NS <= horizon_ns:
                    held = (await conn.execute(text(f"SELECT count(*) FROM {q(name)}"))).scalar()
                    await conn.execute(text(f"DROP TABLE {q(name)}"))
                    rows += int(held or 0)
                    partitions += 1
    else:
        old = select(h.c.bucket, h.c.connection_id).where(h.c.bucket < bucket_of(horizon_ns))
        while True:
            async with engine.begin() as conn:
                result = await conn.execute(
                    delete(h).where(
                        tuple_(h.c.bucket, h.c.connection_id).in_(old.limit(EXPIRE_CHUNK))
                    )
                )
            rows += max(result.rowcount, 0)
            if result.rowcount < EXPIRE_CHUNK:
                break
    return Expired(rows, partitions, await _expire_sightings(engine, tables, horizon_ns, lease_ns))


async def _expire_sightings(
    engine: AsyncEngine, tables: ReadModelTables, horizon_ns: int, lease_ns: int
) -> int:
    s = tables.node_sightings
    later = s.alias("later")
    async with engine.begin() as conn:
        outdone = (
            select(later.c.node_id)
            .where(
                later.c.node_id == s.c.node_id,
                later.c.incarnation >= s.c.incarnation,
                later.c.first_seen_ns > s.c.last_seen_ns,
                later.c.first_seen_ns <= horizon_ns,
            )
            .exists()
        )
        result = await conn.execute(
            delete(s).where(and_(s.c.last_seen_ns + lease_ns < horizon_ns, outdone))
        )
        return max(result.rowcount, 0)


async def read_since(conn: AsyncConnection, tables: ReadModelTables) -> int | None:
    row = (await conn.execute(select(tables.history_since.c.since_ns))).first()
    return None if row is None else int(row[0])
