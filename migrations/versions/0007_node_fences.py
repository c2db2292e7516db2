"""node fences: up to which incarnation each node is fenced, and since when

nodes gains fenced_through (0: never fenced) and fenced_at_ns, the fold of the node's NodeFenced
events (published by the lifecycle role when the node's lease runs out): a connection of a
fenced incarnation is gone for good, whatever the node says later (docs/lifecycle.md). Existing
rows are unfenced, which is what their log says: no NodeFenced was ever published before this
revision.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column(
        "nodes",
        sa.Column("fenced_through", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    )
    op.add_column("nodes", sa.Column("fenced_at_ns", sa.BigInteger))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("fenced_at_ns")
        batch.drop_column("fenced_through")
