"""How fresh an answer is: the projection's position, sent with every answer read from the
read model as trailing metadata, so a client can tell what the answer reflects.

The position is read at most once per `ttl_seconds` and BEFORE the connection row, so the
header is a lower bound: the answer reflects at least every event before those offsets."""

from __future__ import annotations

import asyncio
import time
from typing import Final

from api.repository import ConnectionRepository, PartitionPosition

POSITION_HEADER: Final = "x-projection-offsets"
POSITION_AGE_HEADER: Final = "x-projection-offsets-age-ms"


def format_positions(positions: tuple[PartitionPosition, ...]) -> str:
    """`topic:partition=next_offset` joined by commas; Kafka topic names are [a-zA-Z0-9._-],
    so the separators never clash. Empty when the projector has not applied anything yet."""
    return ",".join(f"{p.topic}:{p.partition}={p.next_offset}" for p in positions)


def parse_positions(header: str) -> dict[tuple[str, int], int]:
    """The inverse of format_positions, for clients and tests."""
    result: dict[tuple[str, int], int] = {}
    for item in filter(None, header.split(",")):
        where, _, offset = item.rpartition("=")
        topic, _, partition = where.rpartition(":")
        result[(topic, int(partition))] = int(offset)
    return result


class ProjectionPosition:
    """The projection's position, cached for a short time so that Get stays one query."""

    def __init__(self, repository: ConnectionRepository, ttl_seconds: float) -> None:
        self._repository = repository
        self._ttl = ttl_seconds
        self._header = ""  # format_positions() of the last reading, formatted once per reading
        self._read_at: float | None = None
        self._refreshing: asyncio.Task[None] | None = None

    def _age(self) -> float | None:
        """Seconds since the last reading, None if it is too old to reuse (or there is none)."""
        if self._read_at is None:
            return None
        age = time.monotonic() - self._read_at
        return age if age < self._ttl else None

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        """Trailing-metadata pairs; raises ReadModelUnavailable if the position cannot be read."""
        age = self._age()
        if age is None:
            # One refresh at a time: calls arriving meanwhile wait for it and share its result
            # (or its error). A caller that gives up does not stop it for the others.
            if self._refreshing is None:
                self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
            await asyncio.shield(self._refreshing)
            assert self._read_at is not None
            age = time.monotonic() - self._read_at
        return ((POSITION_HEADER, self._header), (POSITION_AGE_HEADER, str(int(age * 1000))))

    async def _refresh(self) -> None:
        try:
            self._header = format_positions(await self._repository.positions())
            self._read_at = time.monotonic()
        finally:
            self._refreshing = None
