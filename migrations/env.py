"""Alembic environment: runs migrations through the project's async engine factory."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from conntrack.core.database import create_engine
from conntrack.core.schema import metadata

config = context.config


def _include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    # Shadow and retired generations of `conntrack-audit rebuild` live beside the schema; they
    # are not Alembic's to create or drop.
    return not (type_ == "table" and reflected and (name or "").endswith(("_rebuild", "_retired")))


def _do_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        include_object=_include_object,
        # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_do_run)
            await conn.commit()
    finally:
        await engine.dispose()


def _run_offline(url: str) -> None:
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


_url = config.get_main_option("sqlalchemy.url")
if not _url:
    raise SystemExit("no database URL: set CONNTRACK_DATABASE_URL or pass --database-url")
if context.is_offline_mode():
    _run_offline(_url)
else:
    asyncio.run(_run_online(_url))
