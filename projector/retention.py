"""Retention: rows of connections that disconnected long ago are pruned in small transactions,
each leaving a tombstone so a late duplicate cannot bring the connection back half-empty
(core/store.py, prune()); with a history kept (history_days), a pruned row moves into it, and
what is older than the kept history is expired (core/history_store.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from conntrack.core.history import DAY_NS, oldest_answered
from conntrack.core.history_store import expire
from conntrack.core.retry import Abandoned, Retrier
from conntrack.core.settings import Settings
from conntrack.core.store import CHUNK, ProjectionStore
from conntrack.projector.metrics import ProjectorMetrics

log = logging.getLogger(__name__)


class Retention:
    def __init__(
        self,
        settings: Settings,
        store: ProjectionStore,
        metrics: ProjectorMetrics,
        retry: Retrier,
        stopping: asyncio.Event,
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._retry = retry
        self._stopping = stopping

    @property
    def enabled(self) -> bool:
        s = self._settings
        return s.retention_disconnected_seconds > 0 or s.history_days > 0

    async def run(self) -> None:
        """Prune every retention_interval_seconds until stopping is set."""
        while not self._stopping.is_set():
            try:
                await self.prune_once()
            except Abandoned:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stopping.wait(), self._settings.retention_interval_seconds
                )

    async def prune_once(self, now_ns: int | None = None) -> int:
        """Prune everything due now, in small transactions. Returns the rows pruned."""
        s = self._settings
        now_ns = time.time_ns() if now_ns is None else now_ns
        before = now_ns - s.retention_disconnected_seconds * 1_000_000_000
        # A tombstone younger than the retention age would be useless: it is kept at least as
        # long as the rows themselves are.
        tombstone_age_s = max(s.retention_tombstone_seconds, s.retention_disconnected_seconds)
        tombstones_before = (
            now_ns - tombstone_age_s * 1_000_000_000 if s.retention_tombstone_seconds > 0 else None
        )
        total = 0
        keep = s.history_days > 0
        while s.retention_disconnected_seconds > 0:
            result = await self._retry(
                "database",
                lambda: self._store.prune(before, tombstones_before, CHUNK, keep_history=keep),
            )
            total += result.pruned
            self._metrics.pruned.inc(result.pruned)
            self._metrics.tombstones_expired.inc(result.tombstones_expired)
            if result.pruned < CHUNK and result.tombstones_expired < CHUNK:
                break
            await asyncio.sleep(0)  # let batches in between: pruning is never urgent
        if total:
            log.info("event=pruned rows=%d disconnected_before_ns=%d", total, before)
        if keep:
            horizon = now_ns - s.history_days * DAY_NS
            lease_ns = round(s.node_lease_seconds * 1e9)
            expired = await self._retry(
                "database",
                lambda: expire(self._store.engine, self._store.tables, horizon, lease_ns),
            )
            self._metrics.history_rows_expired.inc(expired.rows)
            since = await self._retry("database", self._store.history_since)
            oldest = oldest_answered(since, now_ns, s.history_days, lease_ns)
            if oldest is not None:
                self._metrics.history_oldest.set(oldest / 1e9)
            if expired.rows or expired.partitions:
                log.info(
                    "event=history_expired rows=%d partitions=%d sightings=%d before_ns=%d",
                    expired.rows,
                    expired.partitions,
                    expired.sightings,
                    horizon,
                )
        return total
