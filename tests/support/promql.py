"""The PromQL the project ships: the Grafana dashboard's queries and the alert rules'
expressions, and the metric names an expression reads."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from tests.support.repo import REPO

DASHBOARD = REPO / "ops" / "grafana" / "conntrack-dashboard.json"
ALERTS = REPO / "ops" / "prometheus" / "alerts.yml"
INSTALL_HINT = "Debian: apt-get install --no-install-recommends prometheus (for promtool)"

_KEYWORDS = {
    "by",
    "without",
    "and",
    "or",
    "unless",
    "on",
    "ignoring",
    "bool",
    "offset",
    "group_left",
    "group_right",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: its identifiers that are neither functions
    (followed by a parenthesis), nor keywords, nor label names (inside braces, or the lists of
    `by`, `without`, `on` and `ignoring`), nor Grafana's variables."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\$\w+", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return {
        m[1]
        for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
        if m[1] not in _KEYWORDS
    }


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        if "expr" in target
    ]


def alert_expressions() -> list[str]:
    """Each rule's `expr`, on its line or as the indented block after `expr: |`."""
    found = re.findall(r"expr: \|\n((?:[ ]{10}.*\n)+)|expr: (.+)", ALERTS.read_text())
    return [block or line for block, line in found]


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        reason = f"promtool is not on PATH ({INSTALL_HINT})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return exe
