"""gateway/metrics.py: the node's counters, its commands' and its Publisher's, as Prometheus
families read when scraped."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import generate_latest

from conntrack.core.latency import LatencyTally
from conntrack.gateway.metrics import gateway_registry
from conntrack.producer.command_execution import NodeCommandsStats
from conntrack.producer.outcomes import PublisherStats


@dataclass
class Sockets:
    open_sockets: int = 3
    frames_received: int = 41
    frames_sent: int = 7
    handshakes_refused: dict[int, int] = field(default_factory=lambda: {401: 2})
    closed_by_gateway: dict[str, int] = field(default_factory=lambda: {"idle_timeout": 1})


def test_the_counters_are_read_when_scraped() -> None:
    sockets = Sockets()
    stats = PublisherStats(
        delivered=10, undelivered=1, in_flight=2, pending_activities=0, coalesced_activities=0
    )
    commands = NodeCommandsStats(received=5, outcomes={"DONE": 4, "EXPIRED": 1})
    registry = gateway_registry(sockets, lambda: stats, lambda: commands)
    value = registry.get_sample_value
    assert value("conntrack_gateway_open_sockets") == 3
    assert value("conntrack_gateway_frames_received_total") == 41
    assert value("conntrack_gateway_handshakes_refused_total", {"status": "401"}) == 2
    assert value("conntrack_gateway_sockets_closed_total", {"why": "idle_timeout"}) == 1
    assert value("conntrack_gateway_command_outcomes_total", {"status": "EXPIRED"}) == 1
    assert value("conntrack_publisher_events_delivered_total") == 10
    assert value("conntrack_publisher_in_flight") == 2
    sockets.frames_received += 1  # the next scrape sees it
    assert value("conntrack_gateway_frames_received_total") == 42
    assert b'conntrack_build_info{component="gateway"' in generate_latest(registry)


def test_a_node_without_commands_has_no_command_families() -> None:
    stats = PublisherStats(0, 0, 0, 0, 0)
    registry = gateway_registry(Sockets(), lambda: stats, lambda: None)
    assert registry.get_sample_value("conntrack_gateway_commands_received_total") is None


def test_latencies_are_histograms_with_inclusive_upper_bounds() -> None:
    delivery = LatencyTally()
    for seconds in (0.001, 0.0011, 0.2, 45.0):
        delivery.observe(seconds)
    stats = PublisherStats(4, 0, 0, 0, 0, delivery_latency=delivery.snapshot())
    commands = NodeCommandsStats()
    commands.latency.observe(-0.5)  # the API's clock ahead of the node's: counted as 0
    registry = gateway_registry(Sockets(), lambda: stats, lambda: commands)
    value = registry.get_sample_value
    bucket = "conntrack_publisher_delivery_seconds_bucket"
    assert value(bucket, {"le": "0.001"}) == 1
    assert value(bucket, {"le": "0.0025"}) == 2
    assert value(bucket, {"le": "0.25"}) == 3
    assert value(bucket, {"le": "30.0"}) == 3
    assert value(bucket, {"le": "+Inf"}) == 4
    assert value("conntrack_publisher_delivery_seconds_count") == 4
    assert value("conntrack_publisher_delivery_seconds_sum") == 45.2021
    assert value("conntrack_gateway_command_seconds_bucket", {"le": "0.001"}) == 1
    assert value("conntrack_gateway_command_seconds_sum") == 0
