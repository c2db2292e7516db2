"""Prometheus metrics of the lifecycle role (one registry per role; docs/lifecycle.md lists
them)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from conntrack.core.process_metrics import add_process_collectors


class LifecycleMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        add_process_collectors(r, "lifecycle")
        self.told = Counter(
            "conntrack_lifecycle_told",
            "Lifecycle events committed to the lifecycle topic, by kind (opened, closed) and, "
            "for closed, reason.",
            ["kind", "reason"],
            registry=r,
        )
        self.fences = Counter(
            "conntrack_lifecycle_fences",
            "Nodes fenced: silent for longer than the lease while holding told-open connections.",
            registry=r,
        )
        self.transactions = Counter(
            "conntrack_lifecycle_transactions",
            "Kafka transactions committed (told records, state, fences and offsets together).",
            registry=r,
        )
        self.transaction_seconds = Histogram(
            "conntrack_lifecycle_transaction_seconds",
            "Time to write and commit one transaction.",
            registry=r,
        )
        self.restarts = Counter(
            "conntrack_lifecycle_restarts",
            "Times the role dropped its state and restored it from the state topic after an "
            "error (the broker away, a transaction that failed), by cause.",
            ["cause"],
            registry=r,
        )
        self.restore_seconds = Gauge(
            "conntrack_lifecycle_restore_seconds",
            "How long the latest restore of the state from the state topic took.",
            registry=r,
        )
        self.open_connections = Gauge(
            "conntrack_lifecycle_open_connections",
            "Connections told opened and not yet closed.",
            registry=r,
        )
        self.lag_seconds = Gauge(
            "conntrack_lifecycle_lag_seconds",
            "From the log append of the oldest event in the latest transaction to the "
            "transaction's commit (0 when nothing was pending): how late the stream tells.",
            registry=r,
        )
        self.lag_records = Gauge(
            "conntrack_lifecycle_lag_records",
            "Records of the events topic not yet read (by the last fetch's end offsets).",
            registry=r,
        )
        self.last_commit = Gauge(
            "conntrack_lifecycle_last_commit_timestamp_seconds",
            "When the role last committed a transaction or found nothing to commit (Unix time).",
            registry=r,
        )
