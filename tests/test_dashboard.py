"""The shipped Grafana dashboard (ops/grafana/conntrack-dashboard.json) is one Grafana imports:
valid JSON, unique panel ids, a Prometheus data source chosen on import, and every query valid
PromQL as promtool parses it. That its every metric is exposed by the running services is checked
against a real scrape of the compose topology (tests/integration/test_compose_stack.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support.promql import DASHBOARD, dashboard_expressions, metric_names, promtool


def test_metric_names_of_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{code=~"X|Y"}'
        "[$__rate_interval]))) / on (instance) group_left b_total > bool 0.5 and c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert metric_names("count by (component) (conntrack_build_info)") == {"conntrack_build_info"}


def test_the_dashboard_is_one_grafana_imports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    assert [v["type"] for v in dashboard["templating"]["list"]] == ["datasource"]
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    # As recording rules, which `promtool check rules` parses; Grafana's $__rate_interval
    # becomes the range it stands for.
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, expr in enumerate(dashboard_expressions()):
        lines += [
            f"      - record: dashboard:query_{n}",
            f"        expr: {json.dumps(expr.replace('$__rate_interval', '5m'))}",
        ]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
