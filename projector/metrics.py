"""Prometheus metrics of the projector (one registry per Projector, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ProjectorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_applied = Counter(
            "conntrack_projector_events_applied", "Events folded into the read model.", ["kind"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "conntrack_projector_events_dead_lettered", "Records sent to the dead-letter topic.",
            registry=r,
        )
        self.batches = Counter(
            "conntrack_projector_batches", "Batches committed to the read model.", registry=r
        )
        self.batch_seconds = Histogram(
            "conntrack_projector_batch_seconds", "Time to write one batch to the read model.",
            registry=r,
        )
        self.fenced = Counter(
            "conntrack_projector_fenced_batches",
            "Batches rolled back because another projector had moved the partition on.",
            registry=r,
        )
        self.retries = Counter(
            "conntrack_projector_retries", "Retries after a database or broker error.", ["cause"],
            registry=r,
        )
        self.last_offset = Gauge(
            "conntrack_projector_last_applied_offset", "Last applied offset per partition.",
            ["topic", "partition"], registry=r,
        )
        self.lag = Gauge(
            "conntrack_projector_lag", "Records behind the log end per partition.",
            ["topic", "partition"], registry=r,
        )
