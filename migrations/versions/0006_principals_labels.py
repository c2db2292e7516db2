"""principals and labels: who each connection is for and what it is, indexed for the directory

connections gains principal and labels (canonical JSON, core/labels.py), both from the
connection's winning Connected event and NULL for connections whose gateway gave none (every
connection written before this revision). Two indexes serve the directory's selectors in
connection_id order, so a page is an index range scan whatever the table's size:

- ix_connections_principal on (gateway_id, principal, connection_id), partial on open rows like
  0005's;
- connection_labels, one row per label of each open connection (the store derives it from the
  connection rows in the batch's transaction and deletes a connection's rows when it closes),
  indexed on (gateway_id, key, value, connection_id). A side table rather than a JSON index, so
  both backends walk the same index: SQLite has no index over arbitrary JSON keys.

Existing rows have no principal or labels, so the new table starts empty and nothing is
backfilled. On PostgreSQL the principal index is built CONCURRENTLY (0005 explains why).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

PRINCIPAL_INDEX = "ix_connections_principal"
LABELS_INDEX = "ix_connection_labels_gateway_id"
OPEN = sa.text("disconnected_at_ns IS NULL")
PRINCIPAL_COLUMNS = ["gateway_id", "principal", "connection_id"]


def upgrade() -> None:
    op.add_column("connections", sa.Column("principal", sa.String(255)))
    op.add_column("connections", sa.Column("labels", sa.Text))
    op.create_table(
        "connection_labels",
        sa.Column("connection_id", sa.String(255), nullable=False),
        sa.Column("key", sa.String(63), nullable=False),
        sa.Column("value", sa.String(255), nullable=False),
        sa.Column("gateway_id", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("connection_id", "key", name=op.f("pk_connection_labels")),
    )
    op.create_index(
        LABELS_INDEX, "connection_labels", ["gateway_id", "key", "value", "connection_id"]
    )
    if op.get_context().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.create_index(
                PRINCIPAL_INDEX,
                "connections",
                PRINCIPAL_COLUMNS,
                postgresql_where=OPEN,
                postgresql_concurrently=True,
            )
    else:
        op.create_index(PRINCIPAL_INDEX, "connections", PRINCIPAL_COLUMNS, sqlite_where=OPEN)


def downgrade() -> None:
    op.drop_index(PRINCIPAL_INDEX, "connections")
    op.drop_index(LABELS_INDEX, "connection_labels")
    op.drop_table("connection_labels")
    with op.batch_alter_table("connections") as batch:
        batch.drop_column("labels")
        batch.drop_column("principal")
