"""Prometheus metrics of the API (one registry per server, so tests can run several).
docs/api.md lists them with their meaning.

Calls are counted under the names and labels of go-grpc-prometheus (grpc_server_started_total,
grpc_server_handled_total, grpc_server_handling_seconds; labels grpc_type, grpc_service,
grpc_method, grpc_code with codes spelled as Go spells them), so the usual gRPC dashboards and
alert rules work unchanged. The registry also holds prometheus_client's process, GC and
platform collectors, as the default registry would.

With several worker processes (api/process/workers.py), every worker's metrics are written to
prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set by the supervisor before
the workers start) and the supervisor serves their sum (aggregated_registry): counters and
histograms add up, calls in flight add up over the live workers, the read model is up only if
it is up for every live worker, and conntrack_api_worker_calls_started tells the workers apart
(label pid)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Final
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from conntrack.api.read.batching import LoaderStats
from conntrack.core.process_metrics import add_process_collectors, register_build_info

# Get is one indexed query: most answers take well under 10 ms; the tail shows a slow database.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

UNARY: Final = "unary"

_READ_QUERIES = "Connection lookups sent to the read model; concurrent Gets share one."
_READ_QUERY_IDS = (
    "Distinct connection ids those lookups asked for (ids / queries: mean batch size)."
)
_READ_IN_FLIGHT = "Connection lookups running now."
_READ_WAITING = "Get calls waiting for the next connection lookup to start."


def code_label(code: grpc.StatusCode) -> str:
    """A status code as go-grpc-prometheus's grpc_code label spells it (Go's codes.Code
    String()): OK, Canceled, InvalidArgument, NotFound, DeadlineExceeded, Unavailable..."""
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    if code is grpc.StatusCode.OK:
        return "OK"
    return "".join(word.capitalize() for word in code.name.split("_"))


def split_method(full_method: str) -> tuple[str, str]:
    """'/package.Service/Method' as (grpc_service, grpc_method)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def aggregated_registry(multiproc_dir: str) -> CollectorRegistry:
    """What the supervisor of several workers serves: the sum of the workers' metrics written
    to multiproc_dir, and python_info. The process_* and python_gc_* families are per process
    and prometheus_client's multiprocess mode cannot add them up, so they are left out."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
    PlatformCollector(registry=registry)
    register_build_info(registry, "api")
    return registry


class ApiMetrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess: bool = False
    ) -> None:
        """multiprocess: this is one of several worker processes whose metrics the supervisor
        serves from prometheus_client's multiprocess files (see the module's docstring)."""
        self.registry = registry or CollectorRegistry()
        self.multiprocess = multiprocess
        r = self.registry
        if not multiprocess:
            # What the default registry holds (process_*, python_gc_*, python_info).
            add_process_collectors(r, "api")
        call_labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            call_labels,
            registry=r,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            [*call_labels, "grpc_code"],
            registry=r,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            call_labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "conntrack_api_calls_in_flight",
            "ConnectionService calls being served now (the concurrency cap applies to these).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.read_model_up = Gauge(
            "conntrack_api_read_model_up",
            "1 if the last readiness probe of the read model succeeded, else 0.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.calls_started = 0  # this process's, for conntrack_api_worker_calls_started
        self._synced: list[Callable[[], None]] = []
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        # labels() looks its child up under a lock and validates the label values on every
        # call; the (method, code) pairs are few, so each is looked up once.
        self._calls: dict[str, tuple[Counter, Histogram]] = {}
        self._handled: dict[tuple[str, grpc.StatusCode], Counter] = {}

    def initialize(self, full_methods: Iterable[str]) -> None:
        """Create every series of these methods at zero (every code, as go-grpc-prometheus's
        InitializeMetrics does), so that rates and alerts see a series before its first call."""
        for full_method in full_methods:
            self._call(full_method)
            for code in grpc.StatusCode:
                self._handled_counter(full_method, code)

    def call_started(self, full_method: str) -> Histogram:
        """Counts a call as started; returns the histogram its handling time goes to."""
        started, handling = self._call(full_method)
        started.inc()
        self.calls_started += 1
        return handling

    def _call(self, full_method: str) -> tuple[Counter, Histogram]:
        children = self._calls.get(full_method)
        if children is None:
            labels = (UNARY, *split_method(full_method))
            children = self.started.labels(*labels), self.handling.labels(*labels)
            self._calls[full_method] = children
        return children

    def _handled_counter(self, full_method: str, code: grpc.StatusCode) -> Counter:
        counter = self._handled.get((full_method, code))
        if counter is None:
            counter = self.handled.labels(UNARY, *split_method(full_method), code_label(code))
            self._handled[(full_method, code)] = counter
        return counter

    def call_handled(
        self, full_method: str, code: grpc.StatusCode, seconds: float, handling: Histogram
    ) -> None:
        self._handled_counter(full_method, code).inc()
        handling.observe(seconds)

    def track_reads(self, stats: Callable[[], LoaderStats]) -> None:
        """Expose how Get lookups were batched into queries, read from `stats` at each scrape
        (so the hot path pays nothing for these metrics). A worker process copies them into
        its multiprocess files at each sync() instead: a collector of its own would never be
        read, as the supervisor serves the files."""
        if not self.multiprocess:
            self.registry.register(_ReadBatchCollector(stats))
            return
        r = self.registry
        queries = Counter("conntrack_api_read_queries", _READ_QUERIES, registry=r)
        query_ids = Counter("conntrack_api_read_query_ids", _READ_QUERY_IDS, registry=r)
        in_flight = Gauge(
            "conntrack_api_read_queries_in_flight",
            _READ_IN_FLIGHT,
            registry=r,
            multiprocess_mode="livesum",
        )
        waiting = Gauge(
            "conntrack_api_read_waiting", _READ_WAITING, registry=r, multiprocess_mode="livesum"
        )
        worker_calls = Gauge(
            "conntrack_api_worker_calls_started",
            "ConnectionService calls this worker process has started (label pid; only when "
            "serve runs several workers).",
            registry=r,
            multiprocess_mode="liveall",
        )
        copied = LoaderStats(queries=0, keys=0, in_flight=0, waiting=0)

        def sync() -> None:
            nonlocal copied
            now = stats()
            queries.inc(now.queries - copied.queries)
            query_ids.inc(now.keys - copied.keys)
            in_flight.set(now.in_flight)
            waiting.set(now.waiting)
            worker_calls.set(self.calls_started)
            copied = now

        self._synced.append(sync)

    def sync(self) -> None:
        """Bring the values read at scrape time into the multiprocess files (a worker calls this
        every second: those metrics are that much behind); nothing to do in one process."""
        for sync in self._synced:
            sync()

    def serve_http(self, port: int, addr: str) -> tuple[str, int]:
        """Expose /metrics on addr:port (port 0 picks a free one); returns the bound address."""
        if self._http is None:
            self._http = start_http_server(port, addr=addr, registry=self.registry)
        host, bound_port = self._http[0].server_address[:2]
        return str(host), int(bound_port)

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
        yield CounterMetricFamily("conntrack_api_read_queries", _READ_QUERIES, value=stats.queries)
        yield CounterMetricFamily("conntrack_api_read_query_ids", _READ_QUERY_IDS, value=stats.keys)
        yield GaugeMetricFamily(
            "conntrack_api_read_queries_in_flight", _READ_IN_FLIGHT, value=stats.in_flight
        )
        yield GaugeMetricFamily("conntrack_api_read_waiting", _READ_WAITING, value=stats.waiting)
