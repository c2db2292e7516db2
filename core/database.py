"""Creating engines for the read model, with per-backend settings that matter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for the read model. SQLite gets WAL (readers never block the projector's
    writer), a busy timeout (several processes may share the file) and its folder created."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, **kwargs)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine.sync_engine, "handle_error")
        def _replace_read_only(context: ExceptionContext) -> None:
            # SQLite opens a file it may not write read-only, silently, and such a connection
            # stays read-only after the file is writable again: treated as a lost connection,
            # it is discarded and the next attempt opens a fresh one.
            if _is_read_only(context.original_exception):
                context.is_disconnect = True

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **kwargs)


# SQLITE_READONLY and its extended codes (SQLITE_READONLY_RECOVERY, _CANTLOCK, ...).
_SQLITE_READONLY = 8


def _is_read_only(exc: BaseException | None) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == _SQLITE_READONLY


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"
