"""The read side's SQL: the statements every read runs, built once, and the directory's queries
built from a filter and the liveness bounds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, String, Table, any_, bindparam, func, or_, select
from sqlalchemy.dialects.postgresql import ARRAY

from conntrack.api.read.views import ConnectionView, DirectoryFilter
from conntrack.core.liveness import LiveBounds
from conntrack.core.schema import connection_labels, connections, nodes, projection_offsets

# Built once: SQLAlchemy then finds the compiled form in its cache by the statement's memoized
# key, where a statement built per call would be traversed to compute its key on every Get.
OPEN_COLUMNS = select(
    connections.c.connection_id,
    connections.c.gateway_id,
    connections.c.source_ip,
    connections.c.user_agent,
    connections.c.connected_at_ns,
    connections.c.last_active_at_ns,
    connections.c.node_id,
    connections.c.node_incarnation,
)
# The directory's rows: Get's columns and who the connection is for and its labels.
DIRECTORY_COLUMNS = OPEN_COLUMNS.add_columns(connections.c.principal, connections.c.labels)
# view_of()'s columns by name, for the same rows of another table (the history).
VIEW_COLUMNS = tuple(c.name for c in DIRECTORY_COLUMNS.selected_columns)
IS_OPEN = (connections.c.connected_at_ns.is_not(None), connections.c.disconnected_at_ns.is_(None))
# One array parameter: the statement text (and so asyncpg's prepared statement) is the same
# whatever the number of ids, where an IN list would prepare one statement per batch size.
OPEN_MANY_PG = OPEN_COLUMNS.where(
    connections.c.connection_id == any_(bindparam("ids", type_=ARRAY(String))), *IS_OPEN
)
# SQLite has no arrays; its statements are cheap to prepare, so an expanding IN is fine.
OPEN_MANY = OPEN_COLUMNS.where(
    connections.c.connection_id.in_(bindparam("ids", expanding=True)), *IS_OPEN
)

POSITIONS = select(
    projection_offsets.c.topic, projection_offsets.c.partition, projection_offsets.c.next_offset
).order_by(projection_offsets.c.topic, projection_offsets.c.partition)

READY = select(connections.c.connection_id).limit(1)

NODES = select(nodes)


def label_candidates_statement(
    where: DirectoryFilter, after_id: str | None, limit: int
) -> Select[Any]:
    """The next `limit` ids after `after_id` that carry the selector's first requirement, from
    the label index in connection_id order: a range scan of ix_connection_labels_gateway_id
    stopped by the LIMIT, whatever the tables' statistics say (a selector's page is read in
    two steps, so no join order is left to the planner: ConnectionRepository.list_open)."""
    key, values = where.labels[0]
    labelled = connection_labels.c
    conditions = [
        labelled.gateway_id == where.gateway_id,
        labelled.key == key,
        labelled.value.in_(values),
    ]
    if after_id is not None:
        conditions.append(labelled.connection_id > after_id)
    return (
        select(labelled.connection_id)
        .where(*conditions)
        .order_by(labelled.connection_id)
        .limit(limit)
    )


def rows_of_statement(
    where: DirectoryFilter, live: LiveBounds, connection_ids: Sequence[str]
) -> Select[Any]:
    """The directory's rows of these ids that meet every condition but the labels (checked in
    Python on the few rows this returns: core/labels.py, matches), by primary key."""
    conditions = directory_conditions(where, live)
    conditions.append(connections.c.connection_id.in_(list(connection_ids)))
    return DIRECTORY_COLUMNS.where(*conditions).order_by(connections.c.connection_id)


def directory_page_statement(
    where: DirectoryFilter, live: LiveBounds, after_id: str | None, limit: int
) -> Select[Any]:
    """ConnectionRepository.list_open()'s query without a label selector (also run by the
    query-plan test)."""
    conditions = directory_conditions(where, live)
    if after_id is not None:
        conditions.append(connections.c.connection_id > after_id)
    return DIRECTORY_COLUMNS.where(*conditions).order_by(connections.c.connection_id).limit(limit)


def open_at(table: Table, at_ns: int) -> list[ColumnElement[bool]]:
    """A row's connection was open at at_ns: connected by then, not disconnected by then."""
    c = table.c
    return [
        c.connected_at_ns <= at_ns,
        or_(c.disconnected_at_ns.is_(None), c.disconnected_at_ns > at_ns),
    ]


def directory_conditions(
    where: DirectoryFilter,
    live: LiveBounds,
    table: Table = connections,
    at_ns: int | None = None,
) -> list[ColumnElement[bool]]:
    """The SQL form of `where` (its labels aside: label_candidates_statement) and of the
    liveness bounds (core/liveness.py,
    LiveBounds: the rule Get applies to one connection, here applied to all of them; a test
    checks the two agree, tests/integration/test_directory.py). On the live table by default
    (open now); with at_ns, on `table` (the connections or their history), open at that
    moment (api/read/history.py)."""
    c = table.c
    # An absent last activity is the connection time, as in view_of().
    last_active = func.coalesce(c.last_active_at_ns, c.connected_at_ns)
    is_open = list(IS_OPEN) if at_ns is None else open_at(table, at_ns)
    conditions: list[ColumnElement[bool]] = [c.gateway_id == where.gateway_id, *is_open]
    if where.node_id is not None:
        conditions.append(c.node_id == where.node_id)
    if where.source_ip is not None:
        conditions.append(c.source_ip == where.source_ip)
    if where.last_active_before_ns is not None:
        conditions.append(last_active < where.last_active_before_ns)
    if where.connected_before_ns is not None:
        conditions.append(c.connected_at_ns < where.connected_before_ns)
    if where.connected_after_ns is not None:
        conditions.append(c.connected_at_ns >= where.connected_after_ns)
    if where.principal is not None:
        conditions.append(c.principal == where.principal)
    if live.min_last_active_ns is not None:
        conditions.append(last_active >= live.min_last_active_ns)
    if live.min_connected_at_ns is not None:
        conditions.append(c.connected_at_ns >= live.min_connected_at_ns)
    judged = live.nodes if where.node_id is None else [where.node_id]
    for node_id in sorted(judged):
        floor = live.node_floor(node_id)
        if floor is not None:
            # A connection of this node is live from the floor incarnation on (none: 0).
            conditions.append(
                or_(
                    c.node_id.is_(None),
                    c.node_id != node_id,
                    func.coalesce(c.node_incarnation, 0) >= floor,
                )
            )
    return conditions


def view_of(row: Sequence[Any]) -> ConnectionView:
    # By position: SQLAlchemy rows and asyncpg records both index, with different name APIs.
    return ConnectionView(
        id=row[0],
        gateway_id=row[1] or "",
        source_ip=row[2] or "",
        user_agent=row[3] or "",
        connected_at_ns=row[4],
        last_active_at_ns=row[5] or row[4],
        node_id=row[6],
        node_incarnation=row[7],
        principal=row[8] if len(row) > 8 else None,
        labels=row[9] if len(row) > 8 else None,
    )
