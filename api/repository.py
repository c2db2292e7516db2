"""Read access to the projection for the API."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, OperationalError, TimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from connection_tracker.schema import connections


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


_OPEN = select(
    connections.c.connection_id,
    connections.c.gateway_id,
    connections.c.source_ip,
    connections.c.user_agent,
    connections.c.connected_at_ns,
    connections.c.last_active_at_ns,
).where(
    connections.c.connected_at_ns.is_not(None),
    connections.c.disconnected_at_ns.is_(None),
)


class ConnectionRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def get_open(self, connection_id: str) -> ConnectionView | None:
        """The connection if it is known and has not disconnected, else None."""
        try:
            async with self._engine.connect() as conn:
                row = (
                    await conn.execute(_OPEN.where(connections.c.connection_id == connection_id))
                ).first()
        except (DBAPIError, OperationalError, TimeoutError, OSError) as exc:
            raise ReadModelUnavailable(str(exc)) from exc
        if row is None:
            return None
        return ConnectionView(
            id=row.connection_id,
            gateway_id=row.gateway_id or "",
            source_ip=row.source_ip or "",
            user_agent=row.user_agent or "",
            connected_at_ns=row.connected_at_ns,
            last_active_at_ns=row.last_active_at_ns or row.connected_at_ns,
        )

    async def ping(self) -> bool:
        try:
            async with self._engine.connect() as conn:
                await conn.execute(select(connections.c.connection_id).limit(1))
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True
