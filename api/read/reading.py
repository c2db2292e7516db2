"""A value read from the read model at most once per time-to-live, shared by every caller: the
projection's position (api/application/freshness.py) and what the log says of the gateway nodes (the
lease, core/liveness.py) are read this way, so that a Get stays one query."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedReading(Generic[T]):
    def __init__(self, read: Callable[[], Awaitable[T]], ttl_seconds: float) -> None:
        self._read = read
        self._ttl = ttl_seconds
        self._value: T | None = None
        self._read_at: float | None = None
        self._refreshing: asyncio.Task[None] | None = None

    def _age(self) -> float | None:
        """Seconds since the last reading, None if it is too old to reuse (or there is none)."""
        if self._read_at is None:
            return None
        age = time.monotonic() - self._read_at
        return age if age < self._ttl else None

    async def get(self) -> tuple[T, float]:
        """The value and its age in seconds. Raises what the read raised (ReadModelUnavailable).

        One read at a time: calls arriving meanwhile wait for it and share its result (or its
        error); a caller that gives up does not stop it for the others."""
        age = self._age()
        if age is None:
            if self._refreshing is None:
                self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
            await asyncio.shield(self._refreshing)
            assert self._read_at is not None
            age = time.monotonic() - self._read_at
        assert self._value is not None
        return self._value, age

    async def _refresh(self) -> None:
        try:
            self._value = await self._read()
            self._read_at = time.monotonic()
        finally:
            self._refreshing = None
