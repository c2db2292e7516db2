"""Waiting out an unavailable dependency (the database, the broker): one policy for every
component that retries, the projector's loop and the rebuild's switch alike.

Delays grow exponentially up to a cap, with jitter ("equal jitter": half the delay fixed, half
random), so that processes that lost the same dependency at the same moment do not come back
in lockstep. A stop request ends the wait at once: a stopping process should not sit out a
backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from aiokafka.errors import KafkaError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

# What "the database or the broker is unavailable" looks like: anything else is a bug and
# should crash loudly rather than spin.
TRANSIENT: tuple[type[BaseException], ...] = (
    OperationalError,
    DBAPIError,
    PoolTimeoutError,
    OSError,
    KafkaError,
)


class Abandoned(Exception):
    """A stop was requested while an operation was waiting to be retried; it did not happen."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential delays from `first_s`, doubling up to `max_s`, each with equal jitter."""

    max_s: float
    first_s: float = 0.1

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        uniform = (rng or random).uniform
        ceiling = min(self.first_s, self.max_s)
        while True:
            yield ceiling / 2 + uniform(0, ceiling / 2)
            ceiling = min(ceiling * 2, self.max_s)


class Retrier:
    """Runs operations until they succeed, waiting out TRANSIENT errors by the backoff; raises
    Abandoned when `stopping` is set while an operation waits to be retried."""

    def __init__(
        self,
        backoff: Backoff,
        stopping: asyncio.Event,
        on_retry: Callable[[str], None] | None = None,
        logger: logging.Logger = log,
    ) -> None:
        """on_retry(cause) runs before every wait (a metric, typically); each retry is logged
        to `logger` (the component's own)."""
        self._log = logger
        self._backoff = backoff
        self._stopping = stopping
        self._on_retry = on_retry

    async def __call__(self, cause: str, op: Callable[[], Awaitable[T]]) -> T:
        """op() until it succeeds. The first attempt is always made (a stop request lets work
        in hand finish); after a failure, a stop request ends the retrying with Abandoned."""
        delays = self._backoff.delays()
        while True:
            try:
                return await op()
            except TRANSIENT as exc:
                if self._stopping.is_set():
                    raise Abandoned(cause) from exc
                delay = next(delays)
                if self._on_retry is not None:
                    self._on_retry(cause)
                self._log.warning(
                    "event=retry cause=%s delay_s=%.1f error=%r", cause, delay, one_line(exc)
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                raise Abandoned(cause)


def one_line(exc: BaseException) -> str:
    """An exception as one log-friendly line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
