"""The shipped Prometheus alerts (ops/prometheus/alerts.yml) are checked as Prometheus checks them
(`promtool check rules`), each fires on its test series and stays quiet on ordinary ones
(`promtool test rules`), every metric they name is one the projector, the API or the lifecycle
role exposes, and each has its runbook entry in docs/operations.md."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from prometheus_client import CollectorRegistry

from conntrack.api.transport.metrics import ApiMetrics
from conntrack.core.latency import LatencyTally
from conntrack.gateway.metrics import gateway_registry
from conntrack.lifecycle.metrics import LifecycleMetrics
from conntrack.lifecycle.webhook import WebhookMetrics
from conntrack.producer.command_execution import NodeCommandsStats
from conntrack.producer.outcomes import PublisherStats
from conntrack.projector.metrics import ProjectorMetrics
from tests.support.promql import promtool

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "ops" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "ops" / "prometheus" / "alerts_test.yml"
OPERATIONS = REPO / "docs" / "operations.md"


def _rules() -> list[dict[str, str]]:
    """Each alert's name, expression and runbook, read from the file's own layout (`- alert:`,
    then `expr:` on its line or as the indented block after `expr: |`, and `runbook:`); promtool
    has checked the YAML itself."""
    rules: list[dict[str, str]] = []
    block: list[str] | None = None
    for line in RULES.read_text().splitlines():
        stripped = line.strip()
        if block is not None:
            if line.startswith(" " * 10) and stripped:
                block.append(stripped)
                continue
            rules[-1]["expr"] = " ".join(block)
            block = None
        if stripped.startswith("- alert: "):
            rules.append({"alert": stripped.removeprefix("- alert: ")})
        elif stripped == "expr: |":
            block = []
        elif stripped.startswith("expr: "):
            rules[-1]["expr"] = stripped.removeprefix("expr: ")
        elif stripped.startswith("runbook: "):
            rules[-1]["runbook"] = stripped.removeprefix("runbook: ").strip('"')
    return rules


def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_alert_fires_on_its_test_series_and_no_other() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in _rules()}


def _exposed(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry's families can expose."""
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count", ""),
    }
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


class _NoSockets:
    open_sockets = frames_received = frames_sent = 0
    handshakes_refused: dict[int, int] = {}  # noqa: RUF012 (read only)
    closed_by_gateway: dict[str, int] = {}  # noqa: RUF012


def _gateway() -> CollectorRegistry:
    publisher = PublisherStats(0, 0, 0, 0, 0, delivery_latency=LatencyTally().snapshot())
    return gateway_registry(_NoSockets(), lambda: publisher, NodeCommandsStats)


def test_every_metric_an_alert_names_is_exposed() -> None:
    exposed = set().union(
        *(
            _exposed(metrics().registry)
            for metrics in (ProjectorMetrics, ApiMetrics, LifecycleMetrics, WebhookMetrics)
        ),
        _exposed(_gateway()),
    )
    named = {
        name
        for rule in _rules()
        # Label names (grpc_code="...") are followed by a matcher; metric names are not.
        for name in re.findall(r"\b((?:conntrack|grpc)_[a-z_]+)\b(?!\s*[=!~])", rule["expr"])
    }
    assert named
    assert named <= exposed, sorted(named - exposed)


def test_each_alert_has_its_runbook_entry() -> None:
    headings = {
        line.removeprefix("### ").strip().lower()
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("### ")
    }
    for rule in _rules():
        anchor = rule["runbook"].split("#", 1)[1]
        assert anchor == rule["alert"].lower()
        assert anchor in headings, f"docs/operations.md has no '### {rule['alert']}'"
