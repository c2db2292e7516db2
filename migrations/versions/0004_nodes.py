"""gateway nodes: the node holding each connection's socket, and what the log says of each node

connections gains node_id and node_incarnation (from the connection's winning Connected event;
NULL for logs written before nodes took part); nodes holds each node's newest incarnation, when
it started and when it was last heard from, so a reader can tell a connection whose node has
started again or gone silent (docs/api.md, "Gateway nodes and the lease").

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("connections", sa.Column("node_id", sa.String(255)))
    op.add_column("connections", sa.Column("node_incarnation", sa.BigInteger))
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(255), nullable=False),
        sa.Column("incarnation", sa.BigInteger, nullable=False),
        sa.Column("started_at_ns", sa.BigInteger),
        sa.Column("last_seen_ns", sa.BigInteger, nullable=False),
        sa.Column("gateway_id", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name=op.f("pk_nodes")),
    )


def downgrade() -> None:
    op.drop_table("nodes")
    with op.batch_alter_table("connections") as batch:
        batch.drop_column("node_incarnation")
        batch.drop_column("node_id")
