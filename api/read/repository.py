"""Read access to the projection for the API: one connection row (concurrent lookups share
queries), a gateway's open connections, the gateway nodes, the projection's position and a
readiness probe, read through one database or the replicas (a ReadSource). Every database
failure surfaces as ReadModelUnavailable."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.read.batching import CoalescingLoader, LoaderStats
from conntrack.api.read.database import (
    APPLICATION_NAME,
    Database,
    ReadSource,
    create_read_engine,
)
from conntrack.api.read.history import HistoryReader
from conntrack.api.read.replicas import ReadReplicas, describe_url
from conntrack.api.read.statements import (
    NODES,
    directory_conditions,
    directory_page_statement,
    label_candidates_statement,
    rows_of_statement,
    view_of,
)
from conntrack.api.read.views import (
    ConnectionView,
    DirectoryFilter,
    PartitionPosition,
    ReadModelUnavailable,
)
from conntrack.core.fold import NodeState
from conntrack.core.labels import from_json, matches
from conntrack.core.liveness import LiveBounds
from conntrack.core.schema import connections, row_to_node
from conntrack.core.settings import Settings, default, split_urls

# The read side's face: what the application layer imports.
__all__ = [
    "APPLICATION_NAME",
    "ConnectionRepository",
    "ConnectionView",
    "DirectoryFilter",
    "PartitionPosition",
    "ReadModelUnavailable",
    "create_read_engine",
    "directory_page_statement",
    "label_candidates_statement",
]

# Connections a count by label selector reads at a time.
COUNT_CHUNK = 5000


class ConnectionRepository:
    """Concurrent get_open() calls share one query (api/read/batching.py): batch_max_ids caps the
    ids per query, batch_max_in_flight the queries running at once, batch_window_seconds the
    least time between two query starts under load (docs/api.md, "How a Get is answered").
    `source`: an engine (read as one Database) or any ReadSource, such as the replicas. Call
    release_connections() when done serving (ApiServer.stop() does)."""

    def __init__(
        self,
        source: AsyncEngine | ReadSource,
        *,
        batch_max_ids: int = default("api_batch_max_ids"),
        batch_max_in_flight: int = default("api_batch_max_in_flight"),
        batch_window_seconds: float = default("api_batch_window_ms") / 1000,
    ) -> None:
        self._source: ReadSource = Database(source) if isinstance(source, AsyncEngine) else source
        self._open = CoalescingLoader(
            self._source.fetch_open,
            max_keys=batch_max_ids,
            max_in_flight=batch_max_in_flight,
            window=batch_window_seconds,
        )

    def history(self) -> HistoryReader:
        """Reads of presence in time through the same source (api/read/history.py)."""
        return HistoryReader(self._source)

    def read_stats(self) -> LoaderStats:
        """How Get lookups were batched into queries (for metrics and tests)."""
        return self._open.stats()

    async def release_connections(self, within_s: float | None = None) -> None:
        """Waits for running queries (at most `within_s`, then they are cancelled: a server past
        its grace does not wait for a database that hangs), then returns held connections to
        the engines' pools (later reads take them again)."""
        try:
            async with asyncio.timeout(within_s):
                await self._open.wait_idle()
        except TimeoutError:
            self._open.cancel_running()
            await self._open.wait_idle()
        await self._source.release(within_s)

    async def get_open(self, connection_id: str) -> ConnectionView | None:
        """The connection if it is known and has not disconnected, else None. Concurrent calls
        share one query (see CoalescingLoader)."""
        if self._source.nul_is_unstorable and "\x00" in connection_id:
            return None
        return await self._open.load(connection_id)

    async def list_open(
        self, where: DirectoryFilter, live: LiveBounds, after_id: str | None, size: int
    ) -> tuple[list[ConnectionView], str | None]:
        """Up to `size` open, live connections matching `where`, in connection_id order, after
        `after_id`, and the key to continue after (None: nothing follows). Keyset pagination:
        an index range scan of ix_connections_gateway_id (or ix_connections_principal), so a
        page costs the same wherever it starts and whatever the table's size.

        With a label selector the page is read in two steps: the next `size` + 1 ids carrying
        its first requirement, from the label index, then their rows by primary key with every
        other condition, the other requirements checked on them here. Each step's work is
        bounded by the page whatever plan the database picks; the page may then hold fewer than
        `size` connections although more follow (the key says where to go on)."""
        if not where.labels:
            statement = directory_page_statement(where, live, after_id, size + 1)
            views = [view_of(row) for row in await self._source.read(statement)]
            more = len(views) > size
            views = views[:size]
            return views, (views[-1].id if more else None)
        ids = [
            cid
            for (cid,) in await self._source.read(
                label_candidates_statement(where, after_id, size + 1)
            )
        ]
        more = len(ids) > size
        ids = ids[:size]
        views = await self._labelled(where, live, ids)
        return views, (ids[-1] if more else None)

    async def _labelled(
        self, where: DirectoryFilter, live: LiveBounds, ids: list[str]
    ) -> list[ConnectionView]:
        if not ids:
            return []
        rows = await self._source.read(rows_of_statement(where, live, ids))
        views = (view_of(row) for row in rows)
        return [v for v in views if matches(where.labels, from_json(v.labels))]

    async def count_open(self, where: DirectoryFilter, live: LiveBounds) -> int:
        """How many open, live connections match `where` (reads every one of them; a label
        selector's in chunks of COUNT_CHUNK, as its pages are read)."""
        if not where.labels:
            statement = select(func.count()).select_from(connections)
            rows = await self._source.read(statement.where(*directory_conditions(where, live)))
            return int(rows[0][0])
        count, after = 0, None
        while True:
            views, after = await self.list_open(where, live, after, COUNT_CHUNK)
            count += len(views)
            if after is None:
                return count

    async def nodes(self) -> dict[str, NodeState]:
        """What the read model says of every gateway node (a handful of rows)."""
        rows = await self._source.read(NODES)
        return {r.node_id: row_to_node(r._mapping) for r in rows}

    async def positions(self) -> tuple[PartitionPosition, ...]:
        """How far the projection has applied each partition (its stored next offsets)."""
        return await self._source.positions()

    async def ping(self) -> None:
        """Raises ReadModelUnavailable unless the read model answers a query on its table."""
        await self._source.ping()


@contextlib.asynccontextmanager
async def open_repository(settings: Settings) -> AsyncIterator[ConnectionRepository]:
    """The API's read model: database_url when no replicas are configured, else the replicas
    (docs/api.md, "Reading from replicas"); the engines are disposed of at the end."""
    replicas = split_urls(settings.api_read_database_urls)
    engines: list[tuple[str, AsyncEngine]] = []
    try:
        for url in replicas or (settings.database_url,):
            engine = create_read_engine(
                url,
                pool_size=settings.api_db_pool_size,
                timeout_seconds=settings.api_db_timeout_seconds,
            )
            engines.append((describe_url(url), engine))
        batching: dict[str, Any] = {
            "batch_max_ids": settings.api_batch_max_ids,
            "batch_max_in_flight": settings.api_batch_max_in_flight,
            "batch_window_seconds": settings.api_batch_window_ms / 1000,
        }
        if not replicas:
            yield ConnectionRepository(engines[0][1], **batching)
        else:
            source = ReadReplicas(
                engines,
                freshness_ttl_seconds=settings.api_freshness_ttl_ms / 1000,
                timeout_seconds=settings.api_db_timeout_seconds,
            )
            yield ConnectionRepository(source, **batching)
    finally:
        for _, engine in engines:
            await engine.dispose()
