"""Creating engines for the read model, with per-backend settings that matter."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import sqlalchemy.ext.asyncio
from sqlalchemy import event
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncEngine


def create_async_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    # Looked up when called: tracing's SQLAlchemy instrumentation (core/tracing_setup.py)
    # replaces the module's function once the process has started.
    return sqlalchemy.ext.asyncio.create_async_engine(url, **kwargs)


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
    if parsed.get_backend_name() == "postgresql":
        parsed, from_url = postgres_connect_arguments(url)
        defaults = kwargs.get("connect_args", {})
        settings = {**defaults.get("server_settings", {}), **from_url.pop("server_settings", {})}
        kwargs["connect_args"] = {**defaults, **from_url}
        if settings:
            kwargs["connect_args"]["server_settings"] = settings
        return create_async_engine(parsed, **kwargs)
    return create_async_engine(url, **kwargs)


class DatabaseUrlError(ValueError):
    """A database URL's parameter the driver cannot take; the message names it."""


# libpq's URL parameters that people paste (managed PostgreSQL consoles hand out
# `?sslmode=require`), which asyncpg takes under other names or not from a URL at all.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SSL_FILES = ("sslrootcert", "sslcert", "sslkey")
_LIBPQ = ("sslmode", *_SSL_FILES, "sslpassword", "application_name", "connect_timeout")
# Taken as they are: asyncpg's own connect arguments and the SQLAlchemy dialect's.
_PASSED_ON = ("ssl", "target_session_attrs", "command_timeout", "prepared_statement_cache_size")


def postgres_connect_arguments(url: str) -> tuple[URL, dict[str, Any]]:
    """The URL without libpq's parameters, and the connect arguments that say the same to
    asyncpg (sslmode: `ssl`, and an SSL context when certificate files are named;
    application_name: a server setting; connect_timeout: `timeout`). Raises DatabaseUrlError
    for a parameter neither libpq's nor asyncpg's, or a value they would not take."""
    parsed = make_url(url)
    query: dict[str, str] = {}
    for key, value in parsed.query.items():
        if not isinstance(value, str):
            raise DatabaseUrlError(f"the database URL gives {key!r} more than once")
        if key not in _LIBPQ + _PASSED_ON:
            raise DatabaseUrlError(
                f"the database URL parameter {key!r} is not one the PostgreSQL driver (asyncpg) "
                f"takes; it takes {', '.join(_LIBPQ + _PASSED_ON)}"
            )
        query[key] = value
    libpq = {key: query.pop(key) for key in _LIBPQ if key in query}
    args: dict[str, Any] = {}
    mode = libpq.get("sslmode")
    if mode is not None and mode not in SSL_MODES:
        raise DatabaseUrlError(f"sslmode must be one of {', '.join(SSL_MODES)}, not {mode!r}")
    files = {key: libpq[key] for key in _SSL_FILES if key in libpq}
    password = libpq.get("sslpassword")
    if files or password is not None:
        args["ssl"] = _ssl_context(mode or "verify-full", files, password)
    elif mode is not None:
        args["ssl"] = mode
    if "application_name" in libpq:
        args["server_settings"] = {"application_name": libpq["application_name"]}
    if "connect_timeout" in libpq:
        try:
            args["timeout"] = float(libpq["connect_timeout"])
        except ValueError:
            raise DatabaseUrlError(
                f"connect_timeout must be a number of seconds, not {libpq['connect_timeout']!r}"
            ) from None
    return parsed.set(query=query), args


def _ssl_context(mode: str, files: dict[str, str], password: str | None) -> ssl.SSLContext:
    """What libpq does with these files: the root certificate verifies the server (for
    `require` too, as libpq does when one is given), the client certificate and key prove the
    client; `verify-full` also checks the server's name."""
    if mode in ("disable", "allow", "prefer"):
        raise DatabaseUrlError(
            f"sslmode={mode} with certificate files: use require, verify-ca or verify-full"
        )
    try:
        context = ssl.create_default_context(cafile=files.get("sslrootcert"))
        context.check_hostname = mode == "verify-full"
        if mode == "require" and "sslrootcert" not in files:
            context.verify_mode = ssl.CERT_NONE
        if "sslcert" in files:
            context.load_cert_chain(files["sslcert"], files.get("sslkey"), password)
    except (OSError, ssl.SSLError) as exc:
        names = ", ".join(f"{k}={v}" for k, v in files.items())
        raise DatabaseUrlError(
            f"cannot use the certificate files of the URL ({names}): {exc}"
        ) from None
    return context


# SQLITE_READONLY and its extended codes (SQLITE_READONLY_RECOVERY, _CANTLOCK, ...).
_SQLITE_READONLY = 8


def _is_read_only(exc: BaseException | None) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == _SQLITE_READONLY


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"
