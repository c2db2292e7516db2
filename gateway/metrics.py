"""Prometheus metrics of a gateway node (`conntrack-gateway`, on CONNTRACK_METRICS_PORT): its
sockets and frames, the node's commands, and its Publisher. Read from the components' own counters
when scraped, so the hot paths (a frame, an event) pay one integer increment, not a metric
update. docs/gateway.md lists them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from conntrack.core.latency import LatencySnapshot
from conntrack.core.process_metrics import add_process_collectors
from conntrack.producer.command_execution import NodeCommandsStats
from conntrack.producer.outcomes import PublisherStats


class SocketCounts(Protocol):
    @property
    def open_sockets(self) -> int: ...

    @property
    def frames_received(self) -> int: ...

    @property
    def frames_sent(self) -> int: ...

    @property
    def handshakes_refused(self) -> dict[int, int]: ...

    @property
    def closed_by_gateway(self) -> dict[str, int]: ...


class _GatewayCollector(Collector):
    def __init__(
        self,
        sockets: SocketCounts,
        publisher: Callable[[], PublisherStats],
        commands: Callable[[], NodeCommandsStats | None],
    ) -> None:
        self._sockets = sockets
        self._publisher = publisher
        self._commands = commands

    def collect(self) -> Iterator[Metric]:
        g = self._sockets
        yield GaugeMetricFamily(
            "conntrack_gateway_open_sockets", "WebSocket connections held now.", g.open_sockets
        )
        yield CounterMetricFamily(
            "conntrack_gateway_frames_received",
            "Messages received from clients.",
            g.frames_received,
        )
        yield CounterMetricFamily(
            "conntrack_gateway_frames_sent",
            "Frames written to clients (Send, Broadcast).",
            g.frames_sent,
        )
        refused = CounterMetricFamily(
            "conntrack_gateway_handshakes_refused",
            "Handshakes refused (no or a bad credential), by HTTP status.",
            labels=["status"],
        )
        for status, count in sorted(g.handshakes_refused.items()):
            refused.add_metric([str(status)], count)
        yield refused
        closed = CounterMetricFamily(
            "conntrack_gateway_sockets_closed",
            "Sockets the gateway closed itself, by why (api, idle_timeout, max_lifetime, "
            "fenced, error).",
            labels=["why"],
        )
        for why, count in sorted(g.closed_by_gateway.items()):
            closed.add_metric([why], count)
        yield closed
        commands = self._commands()
        if commands is not None:
            yield CounterMetricFamily(
                "conntrack_gateway_commands_received",
                "Records read from the node's partition of the commands topic (any node's).",
                commands.received,
            )
            outcomes = CounterMetricFamily(
                "conntrack_gateway_command_outcomes",
                "Outcomes of the node's commands, by status.",
                labels=["status"],
            )
            for name, count in sorted(commands.outcomes.items()):
                outcomes.add_metric([name], count)
            yield outcomes
            yield _histogram(
                "conntrack_gateway_command_seconds",
                "Seconds from a command's issue by the API (its clock) to its outcome on the node.",
                commands.latency.snapshot(),
            )
            yield CounterMetricFamily(
                "conntrack_gateway_commands_duplicate",
                "Commands read again after they were acted on (answered, not executed again).",
                commands.duplicates,
            )
        p = self._publisher()
        yield CounterMetricFamily(
            "conntrack_publisher_events_delivered", "Events the broker acknowledged.", p.delivered
        )
        yield CounterMetricFamily(
            "conntrack_publisher_events_undelivered",
            "Events not delivered (reported to on_undeliverable; without a spool, lost).",
            p.undelivered,
        )
        if p.delivery_latency is not None:
            yield _histogram(
                "conntrack_publisher_delivery_seconds",
                "Seconds from publishing an event to the broker's acknowledgement.",
                p.delivery_latency,
            )
        yield GaugeMetricFamily(
            "conntrack_publisher_in_flight",
            "Events handed to Kafka, not yet acknowledged.",
            p.in_flight,
        )
        heartbeats = CounterMetricFamily(
            "conntrack_publisher_heartbeats",
            "The node's heartbeats, by outcome.",
            labels=["outcome"],
        )
        heartbeats.add_metric(["delivered"], p.heartbeats_delivered)
        heartbeats.add_metric(["dropped"], p.heartbeats_dropped)
        yield heartbeats
        yield GaugeMetricFamily(
            "conntrack_publisher_spool_bytes", "Bytes of events held in the spool.", p.spool_bytes
        )
        yield GaugeMetricFamily(
            "conntrack_publisher_spool_max_bytes",
            "The spool's limit in bytes (0: the gateway has no spool).",
            p.spool_max_bytes,
        )
        yield GaugeMetricFamily(
            "conntrack_publisher_spool_pending",
            "Events in the spool, not yet replayed.",
            p.spool_pending,
        )
        yield CounterMetricFamily(
            "conntrack_publisher_spooled", "Events written to the spool.", p.spooled
        )
        yield CounterMetricFamily(
            "conntrack_publisher_spool_replayed", "Spooled events replayed to Kafka.", p.replayed
        )
        yield CounterMetricFamily(
            "conntrack_publisher_spool_refused",
            "Events the full spool refused.",
            p.spool_refused,
        )


def _histogram(name: str, documentation: str, latency: LatencySnapshot) -> Metric:
    buckets = [("+Inf" if b == float("inf") else repr(b), c) for b, c in latency.buckets]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=latency.sum_s)


def gateway_registry(
    sockets: SocketCounts,
    publisher: Callable[[], PublisherStats],
    commands: Callable[[], NodeCommandsStats | None],
) -> CollectorRegistry:
    registry = CollectorRegistry()
    add_process_collectors(registry, "gateway")
    registry.register(_GatewayCollector(sockets, publisher, commands))
    return registry
