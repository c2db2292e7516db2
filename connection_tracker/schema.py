"""The read model's tables (SQLAlchemy Core). Alembic migrations in migrations/ create them;
tests/integration/test_migrations.py checks that the two agree."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text

# Deterministic constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# One row per connection: the fold's ConnectionState (projector/fold.py). Times are integer
# nanoseconds since the Unix epoch, exact on every backend.
connections = Table(
    "connections",
    metadata,
    Column("connection_id", String(255), primary_key=True),
    Column("gateway_id", String(255)),
    Column("source_ip", Text),
    Column("user_agent", Text),
    Column("connected_at_ns", BigInteger),
    Column("connected_event_id", String(255)),
    Column("last_active_at_ns", BigInteger),
    Column("disconnected_at_ns", BigInteger),
    Column("disconnect_status_code", Integer),
    Column("disconnect_reason", Text),
    Column("disconnected_event_id", String(255)),
)
# Retention prunes by disconnect time (projector/store.py, ProjectionStore.prune).
Index(None, connections.c.disconnected_at_ns)

# Tombstones of connections pruned by retention: a late duplicate event of a pruned connection
# must not resurrect it as a half-empty row (docs/projector.md, "Retention").
pruned_connections = Table(
    "pruned_connections",
    metadata,
    Column("connection_id", String(255), primary_key=True),
    Column("disconnected_at_ns", BigInteger, nullable=False, index=True),
)

# The consumer position of every partition the projection has applied, written in the same
# transaction as the rows it produced: the projection is exactly as far as this table says.
projection_offsets = Table(
    "projection_offsets",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True, autoincrement=False),
    Column("next_offset", BigInteger, nullable=False),
)
