"""How fresh an answer is: the projection's position, sent with every answer read from the
read model as trailing metadata, so a client can tell what the answer reflects.

The position is read at most once per `ttl_seconds` and BEFORE the connection row, so the
header is a lower bound: the answer reflects at least every event before those offsets."""

from __future__ import annotations

from typing import Final

from conntrack.api.read.reading import SharedReading
from conntrack.api.read.repository import ConnectionRepository, PartitionPosition

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
        async def header() -> str:
            return format_positions(await repository.positions())

        # Formatted once per reading, not once per call.
        self._reading = SharedReading(header, ttl_seconds)

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        """Trailing-metadata pairs; raises ReadModelUnavailable if the position cannot be read."""
        header, age = await self._reading.get()
        return ((POSITION_HEADER, header), (POSITION_AGE_HEADER, str(int(age * 1000))))
