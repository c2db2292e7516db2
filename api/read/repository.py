"""Read access to the projection for the API: one connection row, the projection's position,
and a readiness probe. Every database failure surfaces as ReadModelUnavailable."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import ColumnElement, Select, String, any_, bindparam, func, or_, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Executable

from conntrack.api.read.batching import CoalescingLoader, LoaderStats
from conntrack.core.database import create_engine
from conntrack.core.fold import NodeState
from conntrack.core.liveness import LiveBounds
from conntrack.core.schema import connections, nodes, projection_offsets, row_to_node
from conntrack.core.settings import default

log = logging.getLogger(__name__)

APPLICATION_NAME = "conntrack-api"


class ReadModelUnavailable(RuntimeError):
    """The read-model database cannot be reached or answered with an error."""


@dataclass(frozen=True, slots=True)
class ConnectionView:
    id: str
    gateway_id: str
    source_ip: str
    user_agent: str
    connected_at_ns: int
    last_active_at_ns: int
    node_id: str | None = None
    node_incarnation: int | None = None


@dataclass(frozen=True, slots=True)
class DirectoryFilter:
    """Which open connections the connection directory lists or counts
    (api/application/directory.py): a gateway's, and of those the ones every given condition holds
    for (None: no condition)."""

    gateway_id: str
    node_id: str | None = None
    source_ip: str | None = None
    last_active_before_ns: int | None = None
    connected_before_ns: int | None = None  # exclusive
    connected_after_ns: int | None = None  # inclusive


@dataclass(frozen=True, slots=True)
class PartitionPosition:
    topic: str
    partition: int
    next_offset: int


# Built once: SQLAlchemy then finds the compiled form in its cache by the statement's memoized
# key, where a statement built per call would be traversed to compute its key on every Get.
_OPEN_COLUMNS = select(
    connections.c.connection_id,
    connections.c.gateway_id,
    connections.c.source_ip,
    connections.c.user_agent,
    connections.c.connected_at_ns,
    connections.c.last_active_at_ns,
    connections.c.node_id,
    connections.c.node_incarnation,
)
_IS_OPEN = (connections.c.connected_at_ns.is_not(None), connections.c.disconnected_at_ns.is_(None))
# One array parameter: the statement text (and so asyncpg's prepared statement) is the same
# whatever the number of ids, where an IN list would prepare one statement per batch size.
_OPEN_MANY_PG = _OPEN_COLUMNS.where(
    connections.c.connection_id == any_(bindparam("ids", type_=ARRAY(String))), *_IS_OPEN
)
# SQLite has no arrays; its statements are cheap to prepare, so an expanding IN is fine.
_OPEN_MANY = _OPEN_COLUMNS.where(
    connections.c.connection_id.in_(bindparam("ids", expanding=True)), *_IS_OPEN
)

_POSITIONS = select(
    projection_offsets.c.topic, projection_offsets.c.partition, projection_offsets.c.next_offset
).order_by(projection_offsets.c.topic, projection_offsets.c.partition)

_READY = select(connections.c.connection_id).limit(1)

_NODES = select(nodes)


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
        # stale is detected by the query itself and retried once (ConnectionRepository._read).
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


class ConnectionRepository:
    """Concurrent get_open() calls share one query (api/read/batching.py): batch_max_ids caps the
    ids per query, batch_max_in_flight the queries running at once, batch_window_seconds the least
    time between two query starts under load (docs/api.md, "How a Get is
    answered"). Call release_connections() when done serving (ApiServer.stop() does)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_max_ids: int = default("api_batch_max_ids"),
        batch_max_in_flight: int = default("api_batch_max_in_flight"),
        batch_window_seconds: float = default("api_batch_window_ms") / 1000,
    ) -> None:
        self._engine = engine
        postgresql = engine.dialect.name == "postgresql"
        # PostgreSQL text cannot hold NUL, so no stored id contains one; asking would only
        # make the server reject the parameter (and fail every other id in its batch).
        self._nul_is_unstorable = postgresql
        self._open_many = _OPEN_MANY_PG if postgresql else _OPEN_MANY
        self._held = (
            _HeldConnections(engine, str(_OPEN_MANY_PG.compile(dialect=engine.dialect)))
            if postgresql
            else None
        )
        self._open = CoalescingLoader(
            self._fetch_open,
            max_keys=batch_max_ids,
            max_in_flight=batch_max_in_flight,
            window=batch_window_seconds,
        )
        self._reads: set[asyncio.Task[Sequence[Row[Any]]]] = set()  # _read()s not finished

    def read_stats(self) -> LoaderStats:
        """How Get lookups were batched into queries (for metrics and tests)."""
        return self._open.stats()

    async def release_connections(self) -> None:
        """Waits for running queries, then returns held connections to the engine's pool (later
        reads take them again)."""
        await self._open.wait_idle()
        while self._reads:
            await asyncio.wait(set(self._reads))
        if self._held is not None:
            await self._held.release()

    async def _read(
        self,
        statement: Executable,
        parameters: Mapping[str, Any] | None = None,
        *,
        engine: AsyncEngine | None = None,
    ) -> Sequence[Row[Any]]:
        """The rows of one read through SQLAlchemy. A caller that is cancelled stops waiting,
        but the read itself runs to its end (bounded by the pool timeout and, on PostgreSQL,
        statement_timeout): SQLAlchemy answers a cancellation inside a read by invalidating
        the connection mid-operation, and what that leaves behind is reported by asyncio as
        errors ("Task was destroyed but it is pending!" from aiosqlite's close, an
        unretrieved exception from a connect asyncpg abandons half-way). Cancelling would
        not stop a SQLite statement anyway; PostgreSQL lookups, which do need to stop, take
        the held-connection path."""
        read = asyncio.get_running_loop().create_task(
            self._read_through(statement, parameters, engine or self._engine)
        )
        self._reads.add(read)
        read.add_done_callback(self._reads.discard)
        # If the caller is cancelled, shield() marks the read's exception as retrieved.
        return await asyncio.shield(read)

    async def _read_through(
        self, statement: Executable, parameters: Mapping[str, Any] | None, engine: AsyncEngine
    ) -> Sequence[Row[Any]]:
        """A pooled connection that turns out dead (PostgreSQL restarted, the session was
        terminated) makes SQLAlchemy discard it and every connection pooled before it; the
        read is then retried once on a fresh connection, so a restart costs callers nothing
        while a database that is really gone still fails at once."""
        for attempt in (1, 2):
            try:
                async with engine.connect() as conn:
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

    async def get_open(self, connection_id: str) -> ConnectionView | None:
        """The connection if it is known and has not disconnected, else None. Concurrent calls
        share one query (see CoalescingLoader)."""
        if self._nul_is_unstorable and "\x00" in connection_id:
            return None
        return await self._open.load(connection_id)

    async def _fetch_open(self, connection_ids: Sequence[str]) -> dict[str, ConnectionView]:
        return await self._fetch_open_on(self._engine, self._held, connection_ids)

    async def _fetch_open_on(
        self, engine: AsyncEngine, held: _HeldConnections | None, connection_ids: Sequence[str]
    ) -> dict[str, ConnectionView]:
        """The lookup on one database (api/read/engines.py picks a replica's)."""
        if held is None:
            rows = await self._read(self._open_many, {"ids": connection_ids}, engine=engine)
        else:
            try:
                rows = await held.fetch(connection_ids)
            except _ConnectionLost as exc:
                # The ordinary path: SQLAlchemy also discards every connection pooled before the
                # dead one (and retries once more if the next one is dead as well).
                log.info("read model connection was dead (%s); retrying once", exc)
                rows = await self._read(self._open_many, {"ids": connection_ids}, engine=engine)
        views = map(_view, rows)
        return {view.id: view for view in views}

    async def list_open(
        self, where: DirectoryFilter, live: LiveBounds, after_id: str | None, limit: int
    ) -> list[ConnectionView]:
        """Up to `limit` open, live connections matching `where`, in connection_id order, after
        `after_id` (keyset pagination: an index range scan of ix_connections_gateway_id, so a
        page costs the same wherever it starts and whatever the table's size)."""
        statement = directory_page_statement(where, live, after_id, limit)
        return [_view(row) for row in await self._read(statement)]

    async def count_open(self, where: DirectoryFilter, live: LiveBounds) -> int:
        """How many open, live connections match `where` (reads every one of them)."""
        statement = select(func.count()).select_from(connections)
        rows = await self._read(statement.where(*_directory_conditions(where, live)))
        return int(rows[0][0])

    async def nodes(self) -> dict[str, NodeState]:
        """What the read model says of every gateway node (a handful of rows)."""
        rows = await self._read(_NODES)
        return {r.node_id: row_to_node(r._mapping) for r in rows}

    async def positions(self) -> tuple[PartitionPosition, ...]:
        """How far the projection has applied each partition (its stored next offsets)."""
        rows = await self._read(_POSITIONS)
        return tuple(PartitionPosition(r.topic, r.partition, r.next_offset) for r in rows)

    async def ping(self) -> None:
        """Raises ReadModelUnavailable unless the read model answers a query on its table."""
        await self._read(_READY)


def directory_page_statement(
    where: DirectoryFilter, live: LiveBounds, after_id: str | None, limit: int
) -> Select[Any]:
    """ConnectionRepository.list_open()'s query (public for the query-plan test)."""
    conditions = _directory_conditions(where, live)
    if after_id is not None:
        conditions.append(connections.c.connection_id > after_id)
    return _OPEN_COLUMNS.where(*conditions).order_by(connections.c.connection_id).limit(limit)


def _directory_conditions(where: DirectoryFilter, live: LiveBounds) -> list[ColumnElement[bool]]:
    """The SQL form of `where` and of the liveness bounds (core/liveness.py,
    LiveBounds: the rule Get applies to one connection, here applied to all of them; a test
    checks the two agree, tests/integration/test_directory.py)."""
    c = connections.c
    # An absent last activity is the connection time, as in _view().
    last_active = func.coalesce(c.last_active_at_ns, c.connected_at_ns)
    conditions: list[ColumnElement[bool]] = [c.gateway_id == where.gateway_id, *_IS_OPEN]
    if where.node_id is not None:
        conditions.append(c.node_id == where.node_id)
    if where.source_ip is not None:
        conditions.append(c.source_ip == where.source_ip)
    if where.last_active_before_ns is not None:
        conditions.append(last_active < where.last_active_before_ns)
    if where.connected_before_ns is not None:
        conditions.append(c.connected_at_ns < where.connected_before_ns)
    if where.connected_after_ns is not None:
        conditions.append(c.connected_at_ns >= where.connected_after_ns)
    if live.min_last_active_ns is not None:
        conditions.append(last_active >= live.min_last_active_ns)
    if live.min_connected_at_ns is not None:
        conditions.append(c.connected_at_ns >= live.min_connected_at_ns)
    judged = live.nodes if where.node_id is None else [where.node_id]
    for node_id in sorted(judged):
        floor = live.node_floor(node_id)
        if floor is not None:
            # A connection of this node is live from the floor incarnation on (none: 0).
            conditions.append(
                or_(
                    c.node_id.is_(None),
                    c.node_id != node_id,
                    func.coalesce(c.node_incarnation, 0) >= floor,
                )
            )
    return conditions


def _view(row: Sequence[Any]) -> ConnectionView:
    # By position: SQLAlchemy rows and asyncpg records both index, with different name APIs.
    return ConnectionView(
        id=row[0],
        gateway_id=row[1] or "",
        source_ip=row[2] or "",
        user_agent=row[3] or "",
        connected_at_ns=row[4],
        last_active_at_ns=row[5] or row[4],
        node_id=row[6],
        node_incarnation=row[7],
    )


def _describe(exc: BaseException) -> str:
    """The driver's own message without the SQL statement and parameters SQLAlchemy appends:
    parameters are request data and do not belong in logs."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc.orig).__name__}: {exc.orig}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
