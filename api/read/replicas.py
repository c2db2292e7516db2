"""Reading from PostgreSQL streaming replicas (CONNTRACK_API_READ_DATABASE_URLS).

The API reads from the first healthy replica in the order given (not round-robin: see the
freshness header below); a replica whose read fails is marked down and the read is retried on
the next one at once; the health probe (ApiServer, every CONNTRACK_API_HEALTH_INTERVAL_SECONDS)
probes every replica, marks it up again when it answers, and so moves reads back to the first
one. The primary is not read:
to fall back to it when every replica is down, list its URL last.

The freshness header stays a true lower bound (docs/api.md, "Freshness"). On one server it is
one because the position is read before the row and the server never goes back in time: the
projector writes rows and positions in one transaction, which a replica replays whole and in
order. Across replicas that no longer holds (one replica may be behind another), so rows are
read only from a replica known to have reached every position handed out in a header that may
still be in use (the floor: positions read within the header cache's lifetime plus the longest
a call waits). A replica behind the floor is skipped until it catches up; when none has, the
call answers UNAVAILABLE (retry) rather than a header its row might not reflect.

The routing decisions are pure (Routing); ReadReplicas does the I/O around them, as a
ReadSource of the repository (api/read/database.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy.engine import Row, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import Executable

from conntrack.api.read.database import Database
from conntrack.api.read.views import ConnectionView, PartitionPosition, ReadModelUnavailable
from conntrack.core.settings import default

log = logging.getLogger(__name__)

T = TypeVar("T")

Positions = Mapping[tuple[str, int], int]


def as_mapping(positions: Sequence[PartitionPosition]) -> dict[tuple[str, int], int]:
    return {(p.topic, p.partition): p.next_offset for p in positions}


def covers(have: Positions, need: Positions) -> bool:
    """Whether a server at `have` reflects every event a header saying `need` promises (a
    partition missing from `have` has applied nothing)."""
    return all(have.get(key, 0) >= offset for key, offset in need.items())


def describe_url(url: str) -> str:
    """host:port/database, for logs: never the user or password."""
    parsed = make_url(url)
    return f"{parsed.host}:{parsed.port or 5432}/{parsed.database}"


class Routing:
    """Which replica a read goes to: the first, in the configured order, that is up and has
    reached the floor. Pure: the caller reports what it learns (mark_up, mark_down, observed,
    handed_out) with the time; horizon is how long a handed-out position stays in the floor."""

    def __init__(self, replicas: int, horizon_seconds: float) -> None:
        if replicas < 1:
            raise ValueError("at least one replica")
        self._up = [True] * replicas  # optimistic: a first read tells
        self._known: list[dict[tuple[str, int], int]] = [{} for _ in range(replicas)]
        self._horizon = horizon_seconds
        self._handed: deque[tuple[float, dict[tuple[str, int], int]]] = deque()
        self._floor: dict[tuple[str, int], int] = {}
        self._order: tuple[int, ...] = ()
        self._recompute()

    @property
    def replicas(self) -> int:
        return len(self._up)

    def is_up(self, replica: int) -> bool:
        return self._up[replica]

    def floor(self) -> dict[tuple[str, int], int]:
        return dict(self._floor)

    def eligible(self, now: float) -> tuple[int, ...]:
        """The replicas rows may be read from, best first (empty: none may be now)."""
        if not self._order and self._expire(now):
            self._recompute()
        return self._order

    def candidates(self) -> tuple[int, ...]:
        """Every replica, those up first (each group in the configured order): whom to ask
        when none is eligible, so that one which came back is found without waiting."""
        up = [i for i in range(self.replicas) if self._up[i]]
        return (*up, *(i for i in range(self.replicas) if not self._up[i]))

    def mark_down(self, replica: int) -> bool:
        """True if it was up."""
        was, self._up[replica] = self._up[replica], False
        if was:
            self._recompute()
        return was

    def mark_up(self, replica: int) -> bool:
        """True if it was down."""
        was, self._up[replica] = self._up[replica], True
        if not was:
            self._recompute()
        return not was

    def observed(self, replica: int, positions: Positions) -> None:
        """The replica answered these positions (it is at least there from now on)."""
        known = self._known[replica]
        for key, offset in positions.items():
            if offset > known.get(key, -1):
                known[key] = offset
        self._recompute()

    def handed_out(self, positions: Positions, now: float) -> None:
        """These positions go into headers from now on."""
        self._handed.append((now, dict(positions)))
        self._expire(now)
        self._floor = _merge(p for _, p in self._handed)
        self._recompute()

    def _expire(self, now: float) -> bool:
        expired = False
        while self._handed and now - self._handed[0][0] > self._horizon:
            self._handed.popleft()
            expired = True
        if expired:
            self._floor = _merge(p for _, p in self._handed)
        return expired

    def _recompute(self) -> None:
        self._order = tuple(
            i for i in range(self.replicas) if self._up[i] and covers(self._known[i], self._floor)
        )


def _merge(
    readings: Iterable[Mapping[tuple[str, int], int]],
) -> dict[tuple[str, int], int]:
    floor: dict[tuple[str, int], int] = {}
    for reading in readings:
        for key, offset in reading.items():
            if offset > floor.get(key, -1):
                floor[key] = offset
    return floor


class ReadReplicas:
    """A ReadSource over several replicas, each a Database with its own engine (pool) and held
    connections: every read goes to the replica the routing picks, and to the next one when
    it fails. The repository over it still shares lookups (one CoalescingLoader)."""

    def __init__(
        self,
        engines: Sequence[tuple[str, AsyncEngine]],
        *,
        freshness_ttl_seconds: float = default("api_freshness_ttl_ms") / 1000,
        timeout_seconds: float = default("api_db_timeout_seconds"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """engines: (name for logs, engine) per replica, in the order to prefer them."""
        if not engines or any(e.dialect.name != "postgresql" for _, e in engines):
            raise ValueError("read replicas are PostgreSQL engines, at least one")
        self._names = tuple(name for name, _ in engines)
        self._databases = tuple(Database(engine) for _, engine in engines)
        # A header is reused for the cache's lifetime, then the call holding it waits at most
        # the read-model timeout for its row; a second of slack for the event loop.
        self.routing = Routing(len(self._databases), freshness_ttl_seconds + timeout_seconds + 1)
        # A probe of a replica that does not answer must end before the health check's own
        # timeout (the same setting) gives up on every replica at once.
        self._probe_timeout = timeout_seconds * 0.8
        self._clock = clock

    @property
    def nul_is_unstorable(self) -> bool:
        return True  # PostgreSQL, every one

    async def release(self, within_s: float | None = None) -> None:
        await asyncio.gather(*(database.release(within_s) for database in self._databases))

    async def read(
        self, statement: Executable, parameters: Mapping[str, Any] | None = None
    ) -> Sequence[Row[Any]]:
        return await self._routed(lambda i: self._databases[i].read(statement, parameters))

    async def fetch_open(self, connection_ids: Sequence[str]) -> dict[str, ConnectionView]:
        return await self._routed(lambda i: self._databases[i].fetch_open(connection_ids))

    async def positions(self) -> tuple[PartitionPosition, ...]:
        """From the replica rows are read from; in the floor before it is returned."""
        positions = await self._routed(self._positions_of)
        self.routing.handed_out(as_mapping(positions), self._clock())
        return positions

    async def ping(self) -> None:
        """Probes every replica (up and down); raises ReadModelUnavailable unless one is up."""
        problems = await asyncio.gather(*(self._probe(i) for i in range(len(self._databases))))
        if all(problems):
            raise ReadModelUnavailable(
                "no read replica answers: "
                + "; ".join(f"{n}: {p}" for n, p in zip(self._names, problems, strict=True))
            )

    async def _probe(self, index: int) -> str | None:
        """None if the replica answered (its position is then known), else why not."""
        try:
            async with asyncio.timeout(self._probe_timeout):
                await self._databases[index].ping()
                await self._positions_of(index)
        except ReadModelUnavailable as exc:
            self._down(index, str(exc))
            return str(exc)
        except TimeoutError:
            problem = f"no answer within {self._probe_timeout:g}s"
            self._down(index, problem)
            return problem
        self._up(index)
        return None

    async def _positions_of(self, index: int) -> tuple[PartitionPosition, ...]:
        positions = await self._databases[index].positions()
        self.routing.observed(index, as_mapping(positions))
        return positions

    async def _routed(self, read: Callable[[int], Awaitable[T]]) -> T:
        """read(replica) on the first eligible replica, then on the next if it fails; when none
        is eligible, the replicas are asked for their positions to find one that is."""
        tried: set[int] = set()
        failure: ReadModelUnavailable | None = None
        while True:
            index = next((i for i in self.routing.eligible(self._clock()) if i not in tried), None)
            if index is None:
                index = await self._find_eligible(tried)
            if index is None:
                raise failure or ReadModelUnavailable(
                    "every reachable read replica is behind the position already reported; retry"
                )
            tried.add(index)
            try:
                return await read(index)
            except ReadModelUnavailable as exc:
                self._down(index, str(exc))
                failure = exc

    async def _find_eligible(self, tried: set[int]) -> int | None:
        """Asks the replicas not tried yet, up ones first, for their positions: the first that
        answers and has reached the floor (None if none)."""
        for index in self.routing.candidates():
            if index in tried:
                continue
            try:
                await self._positions_of(index)
            except ReadModelUnavailable as exc:
                tried.add(index)
                self._down(index, str(exc))
                continue
            self._up(index)
            if index in self.routing.eligible(self._clock()):
                return index
        return None

    def _down(self, index: int, reason: str) -> None:
        if self.routing.mark_down(index):
            following = self.routing.eligible(self._clock())
            log.warning(
                "read replica %s is unavailable (%s); reads go to %s",
                self._names[index],
                reason,
                self._names[following[0]] if following else "no replica for now",
            )

    def _up(self, index: int) -> None:
        if self.routing.mark_up(index):
            log.info("read replica %s answers again", self._names[index])
