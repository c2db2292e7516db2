"""retention: index on connections.disconnected_at_ns, pruned_connections tombstones

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_connections_disconnected_at_ns"), "connections", ["disconnected_at_ns"]
    )
    op.create_table(
        "pruned_connections",
        sa.Column("connection_id", sa.String(255), nullable=False),
        sa.Column("disconnected_at_ns", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("connection_id", name=op.f("pk_pruned_connections")),
    )
    op.create_index(
        op.f("ix_pruned_connections_disconnected_at_ns"),
        "pruned_connections",
        ["disconnected_at_ns"],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_pruned_connections_disconnected_at_ns"), table_name="pruned_connections")
    op.drop_table("pruned_connections")
    op.drop_index(op.f("ix_connections_disconnected_at_ns"), table_name="connections")
