"""The benchmark harness (bench/, BENCHMARKS.md) keeps working: run it at a tiny scale for two
scenarios against the real Kafka and PostgreSQL, and check that it produced figures, target
verdicts, a table and JSON of the documented shape. The values are not checked: a timing never
decides pass or fail."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from bench.results import SCHEMA, percentile
from bench.workloads import activity_heavy, churn_heavy, group_by_connection, interleave
from conntrack.core.events import Activity, Connected, Disconnected, decode
from conntrack.producer.simulator import generate
from tests.support.bench import run_bench

SCENARIOS = ("projector-activity", "get")


def test_interleave_keeps_each_groups_order_and_every_item() -> None:
    groups = [[(g, i) for i in range(n)] for g, n in enumerate([3, 1, 4, 0, 2])]
    for window in (1, 2, 5, 10):
        out = list(interleave(groups, window))
        assert sorted(out) == sorted(x for g in groups for x in g)
        for g in groups:
            assert [x for x in out if x[0] == (g[0][0] if g else -1)] == g


def test_mixes_have_the_shape_the_issue_names() -> None:
    activity = activity_heavy(1_000).records()
    kinds = [type(decode(v, k).payload) for k, v in activity]
    assert len(activity) == 1_000
    assert kinds.count(Activity) == 900  # 90% activity
    assert Disconnected not in kinds
    # Every connection is live before any activity: all connects come first.
    assert set(kinds[:100]) == {Connected}

    churn = churn_heavy(900)
    events = list(generate(churn.workload))
    per_connection = group_by_connection(events)
    assert all(
        [type(e.payload) for e in g] == [Connected, Activity, Disconnected] for g in per_connection
    )


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([7.0], 99) == 7
    assert percentile([], 50) == 0


def _numbers_are_finite(figure: dict[str, Any]) -> bool:
    return all(
        figure[k] is None or (isinstance(figure[k], int | float) and math.isfinite(figure[k]))
        for k in ("value", "ceiling", "ratio")
    )


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_harness_runs_and_writes_figures_and_json(kafka_bootstrap: str, tmp_path: Path) -> None:
    run = run_bench(
        tmp_path,
        kafka_bootstrap,
        "--only",
        ",".join(SCENARIOS),
        "--get-seconds",
        "0.5",
        "--naive-seconds",
        "0.5",
        timeout=240,
    )
    proc = run.proc
    doc = run.report
    assert doc["schema"] == SCHEMA
    assert doc["meta"]["scale"] == 0.001
    assert doc["meta"]["host"]["cpus"] >= 1
    assert [s["name"] for s in doc["scenarios"]] == list(SCENARIOS)
    for scenario in doc["scenarios"]:
        assert scenario["status"] == "ok", scenario["error"]
        assert scenario["figures"], scenario["name"]
        for figure in scenario["figures"]:
            assert _numbers_are_finite(figure), figure
            assert figure["value"] >= 0, figure
        assert scenario["targets"], scenario["name"]
        for target in scenario["targets"]:
            assert target["verdict"] in ("met", "NOT met", "n/a")
        assert scenario["cpu"], scenario["name"]
    projector = doc["scenarios"][0]
    keys = {f["key"] for f in projector["figures"]}
    assert {"events_per_s", "events_per_s_vs_cpu", "events_per_s_vs_naive"} <= keys
    assert projector["params"]["events"] == projector["params"]["rows"] * 10
    get = doc["scenarios"][1]
    assert {"qps", "p50_ms", "p99_ms", "p99_half_load_ms", "server_cpu_cores"} <= {
        f["key"] for f in get["figures"]
    }
    assert all(f["ceiling"] is not None for f in get["figures"] if f["key"] == "qps")
    # The printed table names every scenario and the targets.
    for name in SCENARIOS:
        assert name in proc.stdout
    assert re.search(r"^scenario\s+target\s+measured\s+verdict", proc.stdout, re.MULTILINE)
