"""Prometheus metrics of the projector (one registry per Projector, so tests can run several).
docs/projector.md lists them with their meaning."""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conntrack.core.batch import Batch
    from conntrack.core.store import BatchResult

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from conntrack.core.process_metrics import add_process_collectors

_BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 20000)


class ProjectorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # The process's own families (process_*, python_gc_*, python_info), as every exporter has.
        add_process_collectors(r, "projector")
        self.freshness_seconds = Histogram(
            "conntrack_projector_freshness_seconds",
            "From the log append of each batch's oldest record to the batch's commit: how long an "
            "event takes to be visible to Get, as the projector sees it.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.applied_append_time = Gauge(
            "conntrack_projector_applied_append_timestamp_seconds",
            "Log append time of the newest record applied (Unix time): time() minus this is how "
            "far behind the read model is, in seconds.",
            registry=r,
        )
        self.last_poll = Gauge(
            "conntrack_projector_last_poll_timestamp_seconds",
            "When the loop last asked the broker for records (Unix time): a loop that hangs "
            "stops moving it, whatever the lag.",
            registry=r,
        )
        self.events_applied = Counter(
            "conntrack_projector_events_applied",
            "Events folded into the read model, by kind.",
            ["kind"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "conntrack_projector_events_dead_lettered",
            "Records sent to the dead-letter topic.",
            registry=r,
        )
        self.batches = Counter(
            "conntrack_projector_batches", "Batches committed to the read model.", registry=r
        )
        self.batch_seconds = Histogram(
            "conntrack_projector_batch_seconds",
            "Time to write one batch to the read model (one transaction).",
            registry=r,
        )
        self.batch_records = Histogram(
            "conntrack_projector_batch_records",
            "Records (events and rejected ones) in one committed batch.",
            buckets=_BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.rows_written = Counter(
            "conntrack_projector_rows_written",
            "Connection rows inserted or updated (after coalescing per connection).",
            registry=r,
        )
        self.suppressed = Counter(
            "conntrack_projector_events_of_pruned_connections",
            "Connection states dropped because retention had pruned the connection.",
            registry=r,
        )
        self.fenced = Counter(
            "conntrack_projector_fenced_batches",
            "Batches rolled back because another projector had moved the partition on.",
            registry=r,
        )
        self.prepared_dropped = Counter(
            "conntrack_projector_prepared_batches_dropped",
            "Batches decoded while the previous one was written, then dropped and read again "
            "because their partitions' positions had moved meanwhile.",
            registry=r,
        )
        self.position_gaps = Counter(
            "conntrack_projector_position_gaps",
            "Fetched records of a partition that did not begin at its stored position: not "
            "applied, the partition was sought to its position and read again.",
            ["topic", "partition"],
            registry=r,
        )
        self.offsets_unused = Counter(
            "conntrack_projector_offsets_unused",
            "Offsets passed over that hold no record a consumer sees (transaction markers, "
            "aborted or compacted records).",
            ["topic", "partition"],
            registry=r,
        )
        self.retries = Counter(
            "conntrack_projector_retries",
            "Retries after a database or broker error.",
            ["cause"],
            registry=r,
        )
        self.last_offset = Gauge(
            "conntrack_projector_last_applied_offset",
            "Offset of the last record applied, per owned partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.lag = Gauge(
            "conntrack_projector_lag",
            "Records between the log end and the applied position, per owned partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.assigned = Gauge(
            "conntrack_projector_assigned_partitions",
            "Partitions of the events topic this process owns.",
            registry=r,
        )
        self.pruned = Counter(
            "conntrack_projector_pruned_connections",
            "Rows of disconnected connections deleted by retention.",
            registry=r,
        )
        self.tombstones_expired = Counter(
            "conntrack_projector_tombstones_expired",
            "Tombstones of pruned connections deleted after their own retention.",
            registry=r,
        )
        self.history_rows_expired = Counter(
            "conntrack_projector_history_rows_expired",
            "History rows older than the kept history, dropped (with their partitions on "
            "PostgreSQL) or deleted.",
            registry=r,
        )
        self.history_oldest = Gauge(
            "conntrack_projector_history_oldest_seconds",
            "The oldest moment answers in time can be asked about, as of the last retention "
            "pass (Unix time).",
            registry=r,
        )

    def applied(self, records: Mapping[Any, Sequence[Any]]) -> None:
        """A batch of these records (per partition, in offset order) is committed now: how long
        after the log appended them (the events topic stamps records with LogAppendTime)."""
        now_ms = time.time() * 1000
        stamps = [rs[0].timestamp for rs in records.values() if rs]
        if stamps:
            self.freshness_seconds.observe(max(0.0, now_ms - min(stamps)) / 1000)
            newest = max(rs[-1].timestamp for rs in records.values() if rs)
            self.applied_append_time.set(newest / 1000)

    def batch_committed(self, batch: Batch, result: BatchResult, elapsed: float) -> None:
        """Count one committed batch."""
        self.batch_seconds.observe(elapsed)
        self.batch_records.observe(batch.records)
        self.batches.inc()
        # One labels() lookup per kind, not per event: this runs for every batch.
        for payload_type, n in collections.Counter(type(e[4]) for e in batch.events).items():
            self.events_applied.labels(payload_type.__name__.lower()).inc(n)
        if batch.rejected:
            self.dead_lettered.inc(len(batch.rejected))
        self.rows_written.inc(result.written)
        if result.suppressed:
            self.suppressed.inc(result.suppressed)
