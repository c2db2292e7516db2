"""Read access to the projection for the API: one connection row, the projection's position,
and a readiness probe. Every database failure surfaces as ReadModelUnavailable."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import Executable

from connection_tracker.database import create_engine
from connection_tracker.schema import connections, projection_offsets

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


@dataclass(frozen=True, slots=True)
class PartitionPosition:
    topic: str
    partition: int
    next_offset: int


# Built once: SQLAlchemy then finds the compiled form in its cache by the statement's memoized
# key, where a statement built per call would be traversed to compute its key on every Get.
_OPEN = select(
    connections.c.connection_id,
    connections.c.gateway_id,
    connections.c.source_ip,
    connections.c.user_agent,
    connections.c.connected_at_ns,
    connections.c.last_active_at_ns,
).where(
    connections.c.connection_id == bindparam("connection_id"),
    connections.c.connected_at_ns.is_not(None),
    connections.c.disconnected_at_ns.is_(None),
)

_POSITIONS = select(
    projection_offsets.c.topic, projection_offsets.c.partition, projection_offsets.c.next_offset
).order_by(projection_offsets.c.topic, projection_offsets.c.partition)

_READY = select(connections.c.connection_id).limit(1)


def create_read_engine(
    url: str, *, pool_size: int = 10, timeout_seconds: float = 5.0
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


class ConnectionRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # PostgreSQL text cannot hold NUL, so no stored id contains one; asking would only
        # make the server reject the parameter.
        self._nul_is_unstorable = engine.dialect.name == "postgresql"

    async def _read(
        self, statement: Executable, parameters: Mapping[str, Any] | None = None
    ) -> Sequence[Row[Any]]:
        """The rows of one read. A pooled connection that turns out dead (PostgreSQL restarted,
        the session was terminated) makes SQLAlchemy discard it and every connection pooled
        before it; the read is then retried once on a fresh connection, so a restart costs
        callers nothing while a database that is really gone still fails at once."""
        for attempt in (1, 2):
            try:
                async with self._engine.connect() as conn:
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
        """The connection if it is known and has not disconnected, else None."""
        if self._nul_is_unstorable and "\x00" in connection_id:
            return None
        rows = await self._read(_OPEN, {"connection_id": connection_id})
        if not rows:
            return None
        row = rows[0]
        return ConnectionView(
            id=row.connection_id,
            gateway_id=row.gateway_id or "",
            source_ip=row.source_ip or "",
            user_agent=row.user_agent or "",
            connected_at_ns=row.connected_at_ns,
            last_active_at_ns=row.last_active_at_ns or row.connected_at_ns,
        )

    async def positions(self) -> tuple[PartitionPosition, ...]:
        """How far the projection has applied each partition (its stored next offsets)."""
        rows = await self._read(_POSITIONS)
        return tuple(PartitionPosition(r.topic, r.partition, r.next_offset) for r in rows)

    async def ping(self) -> None:
        """Raises ReadModelUnavailable unless the read model answers a query on its table."""
        await self._read(_READY)


def _describe(exc: BaseException) -> str:
    """The driver's own message without the SQL statement and parameters SQLAlchemy appends:
    parameters are request data and do not belong in logs."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc.orig).__name__}: {exc.orig}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
