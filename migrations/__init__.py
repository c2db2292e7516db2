"""Alembic migrations of the read model (both SQLite and PostgreSQL)."""
