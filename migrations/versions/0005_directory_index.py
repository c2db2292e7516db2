"""connections: an index for the connection directory's pages

ConnectionDirectoryService.ListConnections (api/application/directory.py) walks a gateway's open
connections in connection_id order from the last id of the previous page (keyset pagination). This
index on (gateway_id, connection_id) holds open rows only (partial: disconnected_at_ns IS NULL), so
a page is an index range scan from the page token's key, whatever the table's size, and the
index stays as small as the set of open connections. Disconnects already change an indexed
column (disconnected_at_ns), so the index costs no HOT update that was HOT before (0003);
activity updates touch no indexed column and stay HOT.

On PostgreSQL the index is built CONCURRENTLY (no lock that blocks the projector's writes on a
large table); that cannot run inside a transaction, hence the autocommit block.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

INDEX = "ix_connections_gateway_id"
OPEN = sa.text("disconnected_at_ns IS NULL")


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.create_index(
                INDEX,
                "connections",
                ["gateway_id", "connection_id"],
                postgresql_where=OPEN,
                postgresql_concurrently=True,
            )
    else:
        op.create_index(INDEX, "connections", ["gateway_id", "connection_id"], sqlite_where=OPEN)


def downgrade() -> None:
    op.drop_index(INDEX, "connections")
