"""One read-model database as the API reads it: an engine with the API's pool and timeouts,
every read turned into rows or ReadModelUnavailable, PostgreSQL lookups on held connections.
ReadSource is what the repository reads through: a Database, or the replicas
(api/read/replicas.py), which route each read to one of their Databases."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Executable

from conntrack.api.read.statements import OPEN_MANY, OPEN_MANY_PG, POSITIONS, READY, view_of
from conntrack.api.read.views import ConnectionView, PartitionPosition, ReadModelUnavailable
from conntrack.core.database import create_engine
from conntrack.core.settings import default

log = logging.getLogger(__name__)

APPLICATION_NAME = "conntrack-api"


class ReadSource(Protocol):
    """Where the repository's reads go."""

    @property
    def nul_is_unstorable(self) -> bool:
        """No stored id holds NUL (PostgreSQL text cannot): such an id need not be asked."""
        ...

    async def read(
        self, statement: Executable, parameters: Mapping[str, Any] | None = None
    ) -> Sequence[Row[Any]]: ...

    async def fetch_open(self, connection_ids: Sequence[str]) -> dict[str, ConnectionView]: ...

    async def positions(self) -> tuple[PartitionPosition, ...]: ...

    async def ping(self) -> None: ...

    async def release(self, within_s: float | None = None) -> None: ...


def create_read_engine(
    url: str,
    *,
    pool_size: int = default("api_db_pool_size"),
    timeout_seconds: float = default("api_db_timeout_seconds"),
) -> AsyncEngine:
    """An engine for the API: a bounded pool (bursts may open as many again), waits for a
    pooled connection or a new one bounded by timeout_seconds, and on PostgreSQL an
    application_name so operators can tell the API's sessions apart in pg_stat_activity."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {
        # Every query the API runs is a single read: in autocommit the driver sends it alone,
        # instead of wrapping it in BEGIN ... ROLLBACK (two more round trips per call).
        "isolation_level": "AUTOCOMMIT",
        # No ping (three round trips on asyncpg) before every checkout: a connection that went
        # stale is detected by the query itself and retried once (Database.read).
        "pool_pre_ping": False,
    }
    if parsed.get_backend_name() != "sqlite" or parsed.database not in (None, "", ":memory:"):
        kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_timeout=timeout_seconds)
    if parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {
            "server_settings": {
                "application_name": APPLICATION_NAME,
                # A call that is cancelled (deadline, client gone) closes its connection; without
                # this, PostgreSQL would keep running (or waiting for a lock on behalf of) the
                # abandoned query until it next writes to the socket.
                "client_connection_check_interval": "500",
                # Nothing the API asks may outlive the time the API waits for its answer.
                "statement_timeout": str(int(timeout_seconds * 1000)),
            },
            "timeout": timeout_seconds,
        }
    return create_engine(url, **kwargs)


class _ConnectionLost(Exception):
    """A held connection turned out dead (PostgreSQL restarted, the session was terminated)."""


@dataclass(frozen=True, slots=True)
class _Held:
    connection: AsyncConnection
    driver: Any  # the asyncpg.Connection under it


class _HeldConnections:
    """PostgreSQL connections taken from the engine's pool once and kept between batch queries
    (at most one per query in flight), each query sent straight through asyncpg with asyncpg's
    own prepared-statement cache. Per query this skips SQLAlchemy's pool checkout and checkin
    and its execution machinery, which together cost about as much CPU as the rest of a Get
    (docs/api.md, "How a Get is answered"). SQLAlchemy still makes the connections, so they
    get the engine's settings (autocommit, application_name, timeouts)."""

    def __init__(self, engine: AsyncEngine, sql: str) -> None:
        self._engine = engine
        self._sql = sql
        self._idle: list[_Held] = []
        self._opening: set[asyncio.Task[_Held]] = set()

    async def fetch(self, *args: Any) -> list[Any]:
        """The statement's rows; raises _ConnectionLost for a connection that turned out dead,
        ReadModelUnavailable for every other database failure."""
        held = self._idle.pop() if self._idle else await self._take()
        try:
            rows: list[Any] = await held.driver.fetch(self._sql, *args)
        except Exception as exc:
            if held.driver.is_closed():
                await self._drop(held)
                raise _ConnectionLost(_describe(exc)) from exc
            if isinstance(exc, asyncpg.PostgresError):
                # The server refused this statement (e.g. statement_timeout, a missing table);
                # the session itself is fine.
                self._idle.append(held)
            else:
                await self._drop(held)
            raise ReadModelUnavailable(_describe(exc)) from exc
        except BaseException:
            # Cancelled (every caller left): asyncpg has sent PostgreSQL a cancel request for
            # the query (which also ends a wait on a lock), and the connection's next query
            # waits until the server has acknowledged it, so the session can be reused. Were it
            # closed instead, asyncpg would abandon that cancel request half-connected.
            self._idle.append(held)
            raise
        self._idle.append(held)
        return rows

    async def _take(self) -> _Held:
        """A new connection. Opening it is not abandoned with the lookup that asked for it
        (asyncpg leaves the error of a connect cancelled half-way unretrieved, logged as
        "Future exception was never retrieved"): if the lookup is cancelled meanwhile, the
        connection, once open, waits idle for the next lookup."""
        opening = asyncio.get_running_loop().create_task(self._open())
        self._opening.add(opening)
        opening.add_done_callback(self._opening.discard)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(self._adopt)
            raise

    def _adopt(self, opening: asyncio.Task[_Held]) -> None:
        # The lookup left; shield() has marked a failure as retrieved (it was the lookup's).
        if not opening.cancelled() and opening.exception() is None:
            self._idle.append(opening.result())

    async def _open(self) -> _Held:
        try:
            connection = await self._engine.connect()
        except (SQLAlchemyError, OSError) as exc:
            raise ReadModelUnavailable(_describe(exc)) from exc
        try:
            raw = await connection.get_raw_connection()
        except BaseException:
            await connection.close()
            raise
        return _Held(connection, raw.driver_connection)

    async def _drop(self, held: _Held) -> None:
        await held.connection.invalidate()
        await held.connection.close()

    async def release(self) -> None:
        """Give the held connections back to the engine's pool (after any still opening)."""
        while self._opening:
            await asyncio.wait(set(self._opening))
            await asyncio.sleep(0)  # let _adopt run
        idle, self._idle = self._idle, []
        for held in idle:
            await held.connection.close()


class Database:
    """The reads of one database through one engine (a ReadSource). Call release() when done
    serving: it waits for running reads and returns held connections to the pool."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        postgresql = engine.dialect.name == "postgresql"
        # PostgreSQL text cannot hold NUL, so no stored id contains one; asking would only
        # make the server reject the parameter (and fail every other id in its batch).
        self._nul_is_unstorable = postgresql
        self._open_many = OPEN_MANY_PG if postgresql else OPEN_MANY
        self._held = (
            _HeldConnections(engine, str(OPEN_MANY_PG.compile(dialect=engine.dialect)))
            if postgresql
            else None
        )
        self._reads: set[asyncio.Task[Sequence[Row[Any]]]] = set()  # read()s not finished

    @property
    def nul_is_unstorable(self) -> bool:
        return self._nul_is_unstorable

    async def release(self, within_s: float | None = None) -> None:
        """Wait for the running reads (at most `within_s`: after that they are left to end by
        themselves, each bounded by statement_timeout), then close the held connections."""
        try:
            async with asyncio.timeout(within_s):
                while self._reads:
                    await asyncio.wait(set(self._reads))
        except TimeoutError:
            log.info("event=reads_left_running reads=%d", len(self._reads))
        if self._held is not None:
            await self._held.release()

    async def read(
        self, statement: Executable, parameters: Mapping[str, Any] | None = None
    ) -> Sequence[Row[Any]]:
        """The rows of one read through SQLAlchemy. A caller that is cancelled stops waiting,
        but the read itself runs to its end (bounded by the pool timeout and, on PostgreSQL,
        statement_timeout): SQLAlchemy answers a cancellation inside a read by invalidating
        the connection mid-operation, and what that leaves behind is reported by asyncio as
        errors ("Task was destroyed but it is pending!" from aiosqlite's close, an
        unretrieved exception from a connect asyncpg abandons half-way). Cancelling would
        not stop a SQLite statement anyway; PostgreSQL lookups, which do need to stop, take
        the held-connection path."""
        read = asyncio.get_running_loop().create_task(self._read_through(statement, parameters))
        self._reads.add(read)
        read.add_done_callback(self._read_done)
        return await asyncio.shield(read)

    def _read_done(self, read: asyncio.Task[Sequence[Row[Any]]]) -> None:
        self._reads.discard(read)
        # A read whose caller gave up (a timeout) fails unobserved: shield() stops watching it
        # when its caller is cancelled, and asyncio would log the exception as an ERROR. The
        # caller has been answered already; marking it retrieved keeps an ordinary timeout quiet.
        if not read.cancelled():
            read.exception()

    async def _read_through(
        self, statement: Executable, parameters: Mapping[str, Any] | None
    ) -> Sequence[Row[Any]]:
        """A pooled connection that turns out dead (PostgreSQL restarted, the session was
        terminated) makes SQLAlchemy discard it and every connection pooled before it; the
        read is then retried once on a fresh connection, so a restart costs callers nothing
        while a database that is really gone still fails at once."""
        for attempt in (1, 2):
            try:
                async with self.engine.connect() as conn:
                    return (await conn.execute(statement, parameters)).all()
            except DBAPIError as exc:
                if not (exc.connection_invalidated and attempt == 1):
                    raise ReadModelUnavailable(_describe(exc)) from exc
                log.info("read model connection was dead (%s); retrying once", _describe(exc))
            # OSError: refused or reset sockets the driver did not wrap; SQLAlchemyError covers
            # pool timeouts and missing tables as well as every wrapped driver error.
            except (SQLAlchemyError, OSError) as exc:
                raise ReadModelUnavailable(_describe(exc)) from exc
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def fetch_open(self, connection_ids: Sequence[str]) -> dict[str, ConnectionView]:
        """The open connections among these ids, in one query."""
        if self._held is None:
            rows = await self.read(self._open_many, {"ids": connection_ids})
        else:
            try:
                rows = await self._held.fetch(connection_ids)
            except _ConnectionLost as exc:
                # The ordinary path: SQLAlchemy also discards every connection pooled before the
                # dead one (and retries once more if the next one is dead as well).
                log.info("read model connection was dead (%s); retrying once", exc)
                rows = await self.read(self._open_many, {"ids": connection_ids})
        views = map(view_of, rows)
        return {view.id: view for view in views}

    async def positions(self) -> tuple[PartitionPosition, ...]:
        """How far the projection has applied each partition (its stored next offsets)."""
        rows = await self.read(POSITIONS)
        return tuple(PartitionPosition(r.topic, r.partition, r.next_offset) for r in rows)

    async def ping(self) -> None:
        """Raises ReadModelUnavailable unless the database answers a query on the table."""
        await self.read(READY)


def _describe(exc: BaseException) -> str:
    """The driver's own message without the SQL statement and parameters SQLAlchemy appends:
    parameters are request data and do not belong in logs."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc.orig).__name__}: {exc.orig}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
