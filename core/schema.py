"""The read model's tables (SQLAlchemy Core). Alembic migrations in migrations/ create them;
tests/integration/test_migrations.py checks that the two agree.

The same tables can be defined under other names (generation()): a rebuild writes a shadow
generation beside the live one and then swaps names (audit/rebuild.py, docs/rebuild.md)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    RowMapping,
    String,
    Table,
    Text,
    text,
)

from conntrack.core.fold import ConnectionState, NodeState
from conntrack.core.ids import MAX_ID_LENGTH
from conntrack.core.labels import MAX_LABEL_KEY_LENGTH, MAX_LABEL_VALUE_LENGTH, from_json

# Deterministic constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


CONNECTIONS_FILLFACTOR = 70
# The columns an answer in time judges a history row by (core/history.py).
INTERVAL_AND_NODE = ("connected_at_ns", "disconnected_at_ns", "node_id", "node_incarnation")


@dataclass(frozen=True)
class ReadModelTables:
    """One generation of the read model: its rows, its tombstones, its positions, its gateway
    nodes and the label index of its open connections."""

    connections: Table
    pruned_connections: Table
    projection_offsets: Table
    nodes: Table
    connection_labels: Table
    connection_history: Table
    node_sightings: Table
    node_fences: Table
    history_since: Table

    @property
    def all(self) -> tuple[Table, ...]:
        return (
            self.connections,
            self.pruned_connections,
            self.projection_offsets,
            self.nodes,
            self.connection_labels,
            self.connection_history,
            self.node_sightings,
            self.node_fences,
            self.history_since,
        )


def define_read_model(metadata: MetaData, suffix: str = "") -> ReadModelTables:
    """The read model's tables named <table><suffix>; with the naming convention every index
    and constraint name follows the table name, so two generations never collide."""
    # One row per connection: the fold's ConnectionState (core/fold.py). Times
    # are integer nanoseconds since the Unix epoch, exact on every backend.
    conns = Table(
        f"connections{suffix}",
        metadata,
        Column("connection_id", String(MAX_ID_LENGTH), primary_key=True),
        Column("gateway_id", String(MAX_ID_LENGTH)),
        Column("source_ip", Text),
        Column("user_agent", Text),
        Column("connected_at_ns", BigInteger),
        Column("connected_event_id", String(MAX_ID_LENGTH)),
        Column("last_active_at_ns", BigInteger),
        Column("disconnected_at_ns", BigInteger),
        Column("disconnect_status_code", Integer),
        Column("disconnect_reason", Text),
        Column("disconnected_event_id", String(MAX_ID_LENGTH)),
        Column("node_id", String(MAX_ID_LENGTH)),
        Column("node_incarnation", BigInteger),
        # Who the connection is for, and its labels as canonical JSON (core/labels.py).
        Column("principal", String(MAX_ID_LENGTH)),
        Column("labels", Text),
        # Room on every page for the next version of its rows: most updates are then HOT
        # (in place, no new index entries). Migration 0003 explains the figure.
        postgresql_with={"fillfactor": CONNECTIONS_FILLFACTOR},
    )
    # Retention prunes by disconnect time (core/store.py, ProjectionStore.prune).
    Index(None, conns.c.disconnected_at_ns)
    # The connection directory's keyset (api/application/directory.py): a gateway's open connections
    # in connection_id order. Partial, so it holds open connections only (migration 0005).
    Index(
        None,
        conns.c.gateway_id,
        conns.c.connection_id,
        postgresql_where=conns.c.disconnected_at_ns.is_(None),
        sqlite_where=conns.c.disconnected_at_ns.is_(None),
    )
    # The directory by principal: a principal's open connections of a gateway in keyset order
    # (migration 0006).
    Index(
        f"ix_{conns.name}_principal",
        conns.c.gateway_id,
        conns.c.principal,
        conns.c.connection_id,
        postgresql_where=conns.c.disconnected_at_ns.is_(None),
        sqlite_where=conns.c.disconnected_at_ns.is_(None),
    )

    # Tombstones of connections pruned by retention: a late duplicate event of a pruned
    # connection must not resurrect it as a half-empty row (docs/projector.md, "Retention").
    pruned = Table(
        f"pruned_connections{suffix}",
        metadata,
        Column("connection_id", String(MAX_ID_LENGTH), primary_key=True),
        Column("disconnected_at_ns", BigInteger, nullable=False, index=True),
    )

    # The consumer position of every partition the projection has applied, written in the same
    # transaction as the rows it produced: the projection is exactly as far as this table says.
    offsets = Table(
        f"projection_offsets{suffix}",
        metadata,
        Column("topic", String(255), primary_key=True),
        Column("partition", Integer, primary_key=True, autoincrement=False),
        Column("next_offset", BigInteger, nullable=False),
    )
    # What the log says of each gateway node (core/fold.py, NodeState): readers
    # judge a connection gone when its node has started again or gone silent.
    nodes = Table(
        f"nodes{suffix}",
        metadata,
        Column("node_id", String(MAX_ID_LENGTH), primary_key=True),
        Column("incarnation", BigInteger, nullable=False),
        Column("started_at_ns", BigInteger),
        Column("last_seen_ns", BigInteger, nullable=False),
        Column("gateway_id", String(MAX_ID_LENGTH), nullable=False),
        # Up to which incarnation the node is fenced (0: none) and since when (migration 0007).
        Column("fenced_through", BigInteger, nullable=False, server_default=text("0")),
        Column("fenced_at_ns", BigInteger),
    )
    # The label index: one row per label of each open connection, derived from the connection
    # rows by the store in the same transaction (core/store.py), so a label selector walks
    # (gateway, key, value) in connection_id order on either backend (migration 0006).
    labels = Table(
        f"connection_labels{suffix}",
        metadata,
        Column("connection_id", String(MAX_ID_LENGTH), primary_key=True),
        Column("key", String(MAX_LABEL_KEY_LENGTH), primary_key=True),
        Column("value", String(MAX_LABEL_VALUE_LENGTH), nullable=False),
        Column("gateway_id", String(MAX_ID_LENGTH), nullable=False),
    )
    Index(None, labels.c.gateway_id, labels.c.key, labels.c.value, labels.c.connection_id)

    # Presence in time (core/history.py, docs/history.md; migration 0008). A closed connection's
    # row, moved here by retention, once per hour its interval touches (`bucket`; `final` marks
    # the row of its last hour, the one a principal's timeline reads). PostgreSQL partitions it
    # by day, so the history is expired a partition at a time (core/history_store.py).
    history = Table(
        f"connection_history{suffix}",
        metadata,
        Column("bucket", BigInteger, primary_key=True, autoincrement=False),
        # The connection's columns, connection_id the key's second part.
        *(Column(c.name, c.type, primary_key=c.primary_key) for c in conns.columns),
        Column("final", Integer, nullable=False),
        postgresql_partition_by="RANGE (bucket)",
    )
    # An answer at a moment: the rows of its hour, a gateway's in connection_id order. On
    # PostgreSQL the index also holds what the conditions of an answer read (the interval, the
    # node), so a count or a page's scan of the hour reads the index alone (BENCHMARKS.md, 12).
    Index(
        None,
        history.c.bucket,
        history.c.gateway_id,
        history.c.connection_id,
        postgresql_include=[*INTERVAL_AND_NODE],
    )
    # A connection as of a moment, by id.
    Index(f"ix_{history.name}_id", history.c.connection_id)
    # A principal's timeline and last sighting: its connections' final rows.
    Index(
        f"ix_{history.name}_principal",
        history.c.principal,
        history.c.gateway_id,
        history.c.connected_at_ns,
        postgresql_where=history.c.final == 1,
        sqlite_where=history.c.final == 1,
    )
    # Each node's sightings, as intervals of one incarnation (core/history.py, Sighting).
    sightings = Table(
        f"node_sightings{suffix}",
        metadata,
        Column("node_id", String(MAX_ID_LENGTH), primary_key=True),
        Column("incarnation", BigInteger, primary_key=True, autoincrement=False),
        Column("first_seen_ns", BigInteger, primary_key=True, autoincrement=False),
        Column("last_seen_ns", BigInteger, nullable=False),
    )
    # Each fence of a node's incarnation, with the earliest time it was decided.
    fences = Table(
        f"node_fences{suffix}",
        metadata,
        Column("node_id", String(MAX_ID_LENGTH), primary_key=True),
        Column("incarnation", BigInteger, primary_key=True, autoincrement=False),
        Column("fenced_at_ns", BigInteger, nullable=False),
    )
    # One row: since when this generation has kept node sightings (before that moment, answers
    # in time cannot judge the nodes).
    since = Table(
        f"history_since{suffix}",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("since_ns", BigInteger, nullable=False),
    )
    return ReadModelTables(conns, pruned, offsets, nodes, labels, history, sightings, fences, since)


def generation(suffix: str) -> ReadModelTables:
    """The read model's tables under other names (a rebuild's shadow or a retired generation),
    in a MetaData of their own: Alembic's target metadata holds only the live tables."""
    return define_read_model(MetaData(naming_convention=NAMING_CONVENTION), suffix)


metadata = MetaData(naming_convention=NAMING_CONVENTION)
LIVE = define_read_model(metadata)
connections = LIVE.connections
pruned_connections = LIVE.pruned_connections
projection_offsets = LIVE.projection_offsets
nodes = LIVE.nodes
connection_labels = LIVE.connection_labels
connection_history = LIVE.connection_history


# A connection row's columns are ConnectionState's fields, by name.
_STATE_FIELDS = ConnectionState._fields


def row_to_state(row: RowMapping | Mapping[str, Any]) -> ConnectionState:
    return ConnectionState(**{name: row[name] for name in _STATE_FIELDS})


def state_to_row(state: ConnectionState) -> dict[str, Any]:
    return dict(zip(_STATE_FIELDS, state, strict=True))


LabelRow = tuple[str, str, str, str]
"""A row of the label index: (connection_id, key, value, gateway_id)."""


def label_rows_of(states: Iterable[ConnectionState]) -> set[LabelRow]:
    """What the label index holds for these states (its definition; the store maintains it and
    `conntrack-audit verify` checks it): every label of every open connection of a gateway."""
    return {
        (s.connection_id, key, value, s.gateway_id)
        for s in states
        if s.is_open and s.gateway_id is not None and s.labels is not None
        for key, value in from_json(s.labels).items()
    }


def row_to_node(row: RowMapping | Mapping[str, Any]) -> NodeState:
    return NodeState(**{name: row[name] for name in NodeState._fields})
