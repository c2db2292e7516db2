"""history: closed connections by the hour, node sightings and fences, for answers in time

Four new tables keep what answers about past moments need (core/history.py, docs/history.md):

- connection_history: a closed connection's row, moved here by retention instead of being
  deleted, once per hour its interval touches (bucket; final marks its last hour). On
  PostgreSQL it is partitioned by range of bucket, a partition a day, created as rows arrive and
  dropped whole when the day leaves the kept history; no partition exists yet.
- node_sightings: each node's sightings as intervals of one incarnation.
- node_fences: each fence of a node's incarnation with the earliest time it was decided.
- history_since: since when node sightings have been kept (the projector writes it on its first
  assignment after this revision): answers about earlier moments are refused.

All start empty; nothing is backfilled (the log can answer about earlier moments:
`conntrack-audit as-of`).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None

FINAL = sa.text("final = 1")


def upgrade() -> None:
    op.create_table(
        "connection_history",
        sa.Column("bucket", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("connection_id", sa.String(255), nullable=False),
        sa.Column("gateway_id", sa.String(255)),
        sa.Column("source_ip", sa.Text),
        sa.Column("user_agent", sa.Text),
        sa.Column("connected_at_ns", sa.BigInteger),
        sa.Column("connected_event_id", sa.String(255)),
        sa.Column("last_active_at_ns", sa.BigInteger),
        sa.Column("disconnected_at_ns", sa.BigInteger),
        sa.Column("disconnect_status_code", sa.Integer),
        sa.Column("disconnect_reason", sa.Text),
        sa.Column("disconnected_event_id", sa.String(255)),
        sa.Column("node_id", sa.String(255)),
        sa.Column("node_incarnation", sa.BigInteger),
        sa.Column("principal", sa.String(255)),
        sa.Column("labels", sa.Text),
        sa.Column("final", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("bucket", "connection_id", name=op.f("pk_connection_history")),
        postgresql_partition_by="RANGE (bucket)",
    )
    op.create_index(
        "ix_connection_history_bucket",
        "connection_history",
        ["bucket", "gateway_id", "connection_id"],
        postgresql_include=[
            "connected_at_ns",
            "disconnected_at_ns",
            "node_id",
            "node_incarnation",
        ],
    )
    op.create_index("ix_connection_history_id", "connection_history", ["connection_id"])
    op.create_index(
        "ix_connection_history_principal",
        "connection_history",
        ["principal", "gateway_id", "connected_at_ns"],
        postgresql_where=FINAL,
        sqlite_where=FINAL,
    )
    op.create_table(
        "node_sightings",
        sa.Column("node_id", sa.String(255), nullable=False),
        sa.Column("incarnation", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("first_seen_ns", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("last_seen_ns", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint(
            "node_id", "incarnation", "first_seen_ns", name=op.f("pk_node_sightings")
        ),
    )
    op.create_table(
        "node_fences",
        sa.Column("node_id", sa.String(255), nullable=False),
        sa.Column("incarnation", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("fenced_at_ns", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("node_id", "incarnation", name=op.f("pk_node_fences")),
    )
    op.create_table(
        "history_since",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("since_ns", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_history_since")),
    )


def downgrade() -> None:
    op.drop_table("history_since")
    op.drop_table("node_fences")
    op.drop_table("node_sightings")
    op.drop_index("ix_connection_history_principal", "connection_history")
    op.drop_index("ix_connection_history_id", "connection_history")
    op.drop_index("ix_connection_history_bucket", "connection_history")
    op.drop_table("connection_history")
