"""What every process's metrics registry holds besides its own families: the process collectors
every Prometheus client exports (process_*, python_gc_*, python_info), and
`conntrack_build_info{component, version, python} 1`, so a dashboard can tell which version each
process runs during a rolling upgrade."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
)


def package_version() -> str:
    try:
        return version("ws-connection-tracker")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def register_build_info(registry: CollectorRegistry, component: str) -> None:
    Info(
        "conntrack_build",
        "The running process: which component, which release of the package, which Python.",
        registry=registry,
    ).info(
        {
            "component": component,
            "version": package_version(),
            "python": platform.python_version(),
        }
    )


def add_process_collectors(registry: CollectorRegistry, component: str) -> None:
    """The process collectors and the build info, in a registry of `component` (projector,
    api, lifecycle, webhook, gateway)."""
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    register_build_info(registry, component)
