"""Reads of presence in time (core/history.py, docs/history.md): what a gateway's connections
were at a past moment, a connection as of a moment, a principal's last sighting and sessions.

A connection is in exactly one of two tables: `connections` (open, or closed and not yet
pruned) or `connection_history` (closed and pruned; a row per hour its interval touches). Each
answer is one statement over both (UNION ALL), so a prune moving rows between them while it
runs cannot make a connection appear twice or not at all. The nodes' state at the moment comes
from their sighting intervals and fences (core/history.py, nodes_at)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, Table, func, literal, or_, select, union_all

from conntrack.api.read.database import ReadSource
from conntrack.api.read.statements import VIEW_COLUMNS, directory_conditions, view_of
from conntrack.api.read.views import ConnectionView, DirectoryFilter
from conntrack.core.history import Sighting, bucket_of, nodes_at
from conntrack.core.liveness import LiveBounds, Liveness
from conntrack.core.schema import LIVE

CONNECTIONS, HISTORY = LIVE.connections, LIVE.connection_history
# The close's columns after view_of()'s: a row of a past answer.
CLOSE_COLUMNS = ("disconnected_at_ns", "disconnect_status_code", "disconnect_reason")


@dataclass(frozen=True, slots=True)
class PastConnection:
    view: ConnectionView
    disconnected_at_ns: int | None
    status_code: int | None
    reason: str | None


def _columns(table: Table) -> list[Any]:
    return [table.c[name] for name in (*VIEW_COLUMNS, *CLOSE_COLUMNS)]


def _past(row: Sequence[Any]) -> PastConnection:
    n = len(VIEW_COLUMNS)
    return PastConnection(view_of(row[:n]), row[n], row[n + 1], row[n + 2])


def _union(*parts: Select[Any]) -> Any:
    return union_all(*(select(p.subquery()) for p in parts)).subquery()


def _both(
    live_part: Select[Any], history_part: Select[Any], order: Sequence[str], limit: int | None
) -> Select[Any]:
    """One statement over both tables: each part ordered and limited alike, then merged (each
    a subquery of its own: SQLite takes no ORDER BY or LIMIT on a compound's members)."""
    parts = _union(live_part, history_part)
    statement = select(parts).order_by(*(parts.c[name] for name in order))
    return statement if limit is None else statement.limit(limit)


def page_at_statement(
    where: DirectoryFilter, live: LiveBounds, at_ns: int, after_id: str | None, limit: int
) -> Select[Any]:
    """The connections of `where` open and live at at_ns, in connection_id order after
    after_id (labels aside: checked on the rows)."""

    def part(table: Table, extra: list[ColumnElement[bool]]) -> Select[Any]:
        conditions = directory_conditions(where, live, table, at_ns) + extra
        if after_id is not None:
            conditions.append(table.c.connection_id > after_id)
        return (
            select(*_columns(table)).where(*conditions).order_by(table.c.connection_id).limit(limit)
        )

    return _both(
        part(CONNECTIONS, []),
        part(HISTORY, [HISTORY.c.bucket == bucket_of(at_ns)]),
        ["connection_id"],
        limit,
    )


def count_at_statement(where: DirectoryFilter, live: LiveBounds, at_ns: int) -> Select[Any]:
    def part(table: Table, extra: list[ColumnElement[bool]]) -> Any:
        conditions = directory_conditions(where, live, table, at_ns) + extra
        return select(func.count()).select_from(table).where(*conditions).scalar_subquery()

    return select(part(CONNECTIONS, []) + part(HISTORY, [HISTORY.c.bucket == bucket_of(at_ns)]))


def connection_statement(connection_id: str) -> Select[Any]:
    """A connection's row, wherever it is (any of its history rows: they differ only in
    their hour)."""
    return _both(
        select(*_columns(CONNECTIONS)).where(CONNECTIONS.c.connection_id == connection_id),
        select(*_columns(HISTORY)).where(HISTORY.c.connection_id == connection_id).limit(1),
        ["connection_id"],
        1,
    )


def _principal(table: Table, gateway_id: str, principal: str) -> list[ColumnElement[bool]]:
    conditions = [table.c.gateway_id == gateway_id, table.c.principal == principal]
    if table is HISTORY:
        conditions.append(HISTORY.c.final == 1)
    return conditions


def last_seen_statement(gateway_id: str, principal: str) -> Select[Any]:
    """The principal's connection with the latest activity, in either table."""

    def part(table: Table) -> Select[Any]:
        last = func.coalesce(table.c.last_active_at_ns, table.c.connected_at_ns)
        return (
            select(last.label("seen"), table.c.connection_id)
            .where(*_principal(table, gateway_id, principal), table.c.connected_at_ns.is_not(None))
            .order_by(last.desc(), table.c.connection_id)
            .limit(1)
        )

    parts = _union(part(CONNECTIONS), part(HISTORY))
    return select(parts).order_by(parts.c.seen.desc(), parts.c.connection_id).limit(1)


def sessions_statement(
    gateway_id: str,
    principal: str,
    start_ns: int,
    end_ns: int,
    after: tuple[int, str] | None,
    limit: int,
) -> Select[Any]:
    """The principal's connections overlapping [start_ns, end_ns), in (connected_at,
    connection_id) order after `after`."""

    def part(table: Table) -> Select[Any]:
        c = table.c
        conditions = [
            *_principal(table, gateway_id, principal),
            c.connected_at_ns < end_ns,
            or_(c.disconnected_at_ns.is_(None), c.disconnected_at_ns >= start_ns),
        ]
        if after is not None:
            conditions.append(
                or_(
                    c.connected_at_ns > after[0],
                    (c.connected_at_ns == after[0]) & (c.connection_id > after[1]),
                )
            )
        return (
            select(*_columns(table))
            .where(*conditions)
            .order_by(c.connected_at_ns, c.connection_id)
            .limit(limit)
        )

    return _both(part(CONNECTIONS), part(HISTORY), ["connected_at_ns", "connection_id"], limit)


SINCE = select(LIVE.history_since.c.since_ns)


def nodes_statement(at_ns: int) -> Select[Any]:
    """The nodes' sightings and fences up to at_ns, in one statement: (node, incarnation,
    first seen, last seen, 0) for a sighting interval, (node, incarnation, decided, decided, 1)
    for a fence."""
    s, f = LIVE.node_sightings.c, LIVE.node_fences.c
    sightings = select(
        s.node_id,
        s.incarnation,
        s.first_seen_ns.label("first"),
        s.last_seen_ns.label("last"),
        literal(0).label("fence"),
    ).where(s.first_seen_ns <= at_ns)
    fences = select(f.node_id, f.incarnation, f.fenced_at_ns, f.fenced_at_ns, literal(1)).where(
        f.fenced_at_ns <= at_ns
    )
    return select(union_all(sightings, fences).subquery())


class HistoryReader:
    """The reads above through the API's ReadSource (the database or its replicas)."""

    def __init__(self, source: ReadSource) -> None:
        self._source = source

    async def since(self) -> int | None:
        """Since when the read model has kept node sightings (None: not yet)."""
        rows = await self._source.read(SINCE)
        return None if not rows else int(rows[0][0])

    async def bounds_at(self, liveness: Liveness, at_ns: int) -> LiveBounds:
        """The liveness rules at a past moment: the nodes as they were then, the maximum
        lifetime; not the idle rule (activity is not kept moment by moment)."""
        sightings: list[Sighting] = []
        fences: dict[tuple[str, int], int] = {}
        for r in await self._source.read(nodes_statement(at_ns)):
            node_id, incarnation, first, last = r.node_id, int(r.incarnation), r.first, r.last
            if r.fence:
                fences[(node_id, incarnation)] = int(first)
            else:
                sightings.append(Sighting(node_id, incarnation, int(first), int(last)))
        lifetime = liveness.max_lifetime_ns
        return LiveBounds(
            min_last_active_ns=None,
            min_connected_at_ns=at_ns - lifetime if lifetime else None,
            nodes=nodes_at(sightings, fences, at_ns, liveness.node_lease_ns),
        )

    async def page_at(
        self, where: DirectoryFilter, live: LiveBounds, at_ns: int, after_id: str | None, limit: int
    ) -> list[PastConnection]:
        rows = await self._source.read(page_at_statement(where, live, at_ns, after_id, limit))
        return [_past(r) for r in rows]

    async def count_at(self, where: DirectoryFilter, live: LiveBounds, at_ns: int) -> int:
        rows = await self._source.read(count_at_statement(where, live, at_ns))
        return int(rows[0][0])

    async def connection(self, connection_id: str) -> PastConnection | None:
        rows = await self._source.read(connection_statement(connection_id))
        return _past(rows[0]) if rows else None

    async def last_seen(self, gateway_id: str, principal: str) -> tuple[int, str] | None:
        rows = await self._source.read(last_seen_statement(gateway_id, principal))
        return (int(rows[0].seen), str(rows[0].connection_id)) if rows else None

    async def sessions(
        self,
        gateway_id: str,
        principal: str,
        start_ns: int,
        end_ns: int,
        after: tuple[int, str] | None,
        limit: int,
    ) -> list[PastConnection]:
        statement = sessions_statement(gateway_id, principal, start_ns, end_ns, after, limit)
        return [_past(r) for r in await self._source.read(statement)]
