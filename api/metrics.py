"""Prometheus metrics of the API (one registry per server, so tests can run several).
docs/api.md lists them with their meaning."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.batching import LoaderStats

# Get is one indexed query: most answers take well under 10 ms; the tail shows a slow database.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "conntrack_api_requests",
            "Finished unary calls, by full method name and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "conntrack_api_request_seconds",
            "Time from receiving a unary call to its status, by method and status code.",
            ["method", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "conntrack_api_calls_in_flight",
            "ConnectionService calls being served now (the concurrency cap applies to these).",
            registry=r,
        )
        self.read_model_up = Gauge(
            "conntrack_api_read_model_up",
            "1 if the last readiness probe of the read model succeeded, else 0.",
            registry=r,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        # labels() looks its child up under a lock and validates the label values on every
        # call; the (method, code) pairs are few, so each is looked up once.
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def track_reads(self, stats: Callable[[], LoaderStats]) -> None:
        """Expose how Get lookups were batched into queries, read from `stats` at each scrape
        (so the hot path pays nothing for these metrics)."""
        self.registry.register(_ReadBatchCollector(stats))

    def observe(self, method: str, code: str, seconds: float) -> None:
        children = self._children.get((method, code))
        if children is None:
            children = self.requests.labels(method, code), self.latency.labels(method, code)
            self._children[(method, code)] = children
        requests, latency = children
        requests.inc()
        latency.observe(seconds)

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> int:
        """Expose /metrics on port (0 picks a free one); returns the bound port."""
        if self._http is None:
            self._http = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._http[0].server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            server, thread = self._http
            self._http = None
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


class _ReadBatchCollector(Collector):
    def __init__(self, stats: Callable[[], LoaderStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield CounterMetricFamily(
            "conntrack_api_read_queries",
            "Connection lookups sent to the read model; concurrent Gets share one.",
            value=stats.queries,
        )
        yield CounterMetricFamily(
            "conntrack_api_read_query_ids",
            "Distinct connection ids those lookups asked for (ids / queries: mean batch size).",
            value=stats.keys,
        )
        yield GaugeMetricFamily(
            "conntrack_api_read_queries_in_flight",
            "Connection lookups running now.",
            value=stats.in_flight,
        )
        yield GaugeMetricFamily(
            "conntrack_api_read_waiting",
            "Get calls waiting for the next connection lookup to start.",
            value=stats.waiting,
        )
