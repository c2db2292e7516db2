"""connections and projection_offsets

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "connections",
        sa.Column("connection_id", sa.String(255), nullable=False),
        sa.Column("gateway_id", sa.String(255)),
        sa.Column("source_ip", sa.Text()),
        sa.Column("user_agent", sa.Text()),
        sa.Column("connected_at_ns", sa.BigInteger()),
        sa.Column("connected_event_id", sa.String(255)),
        sa.Column("last_active_at_ns", sa.BigInteger()),
        sa.Column("disconnected_at_ns", sa.BigInteger()),
        sa.Column("disconnect_status_code", sa.Integer()),
        sa.Column("disconnect_reason", sa.Text()),
        sa.Column("disconnected_event_id", sa.String(255)),
        sa.PrimaryKeyConstraint("connection_id", name=op.f("pk_connections")),
    )
    op.create_table(
        "projection_offsets",
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("partition", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("next_offset", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("topic", "partition", name=op.f("pk_projection_offsets")),
    )


def downgrade() -> None:
    op.drop_table("projection_offsets")
    op.drop_table("connections")
