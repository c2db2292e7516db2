"""A read model written the way the projector writes it (one fenced batch at a time), and the
connection states the directory and broadcast tests put in it."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.core.fold import ConnectionState, NodeState
from conntrack.core.labels import normalized, to_json
from conntrack.core.store import ProjectionStore

S = 1_000_000_000
TOPIC = "events-dir"


class ReadModel:
    """Writes states and nodes the way the projector does: one fenced batch at a time."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.store = ProjectionStore(engine)
        self._offset: int | None = None

    async def apply(
        self, states: Iterable[ConnectionState], nodes: Iterable[NodeState] = ()
    ) -> None:
        if self._offset is None:
            self._offset = (await self.store.positions(TOPIC, [0]))[0]
        await self.store.apply_batch(
            TOPIC,
            {0: (self._offset, self._offset + 1)},
            {s.connection_id: s for s in states},
            {n.node_id: n for n in nodes},
        )
        self._offset += 1


def opened(
    cid: str,
    gateway: str,
    at: int,
    *,
    ip: str = "10.0.0.1",
    active: int | None = None,
    node: str | None = None,
    incarnation: int | None = None,
    principal: str | None = None,
    labels: dict[str, str] | None = None,
) -> ConnectionState:
    return ConnectionState(
        connection_id=cid,
        gateway_id=gateway,
        source_ip=ip,
        user_agent="ua/1",
        connected_at_ns=at,
        connected_event_id=f"{cid}-c",
        last_active_at_ns=active,
        node_id=node,
        node_incarnation=incarnation,
        principal=principal,
        labels=to_json(normalized(labels)),
    )


def closed(state: ConnectionState, at: int) -> ConnectionState:
    return state._replace(
        disconnected_at_ns=at,
        disconnect_status_code=1000,
        disconnect_reason="bye",
        disconnected_event_id=f"{state.connection_id}-d",
    )


async def reltuples(engine: AsyncEngine, table: str) -> float:
    """PostgreSQL's row estimate of a table (-1: never analyzed, PostgreSQL 14 on)."""
    async with engine.connect() as conn:
        found = await conn.execute(
            text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"), {"t": table}
        )
        return float(found.scalar_one())
