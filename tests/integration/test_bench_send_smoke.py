"""The Send benchmark (bench/scenarios/send.py, BENCHMARKS.md figure 6) keeps working: run it
at a tiny size (a few clients, a low rate, half a second) against the real Kafka and PostgreSQL
with a real gateway node, and check that every Send reached its client and that it produced the
documented figures, targets and JSON. The values are not checked: a timing never decides pass
or fail."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from bench.scenarios.send import GO_GATEWAY
from tests.support.bench import run_bench


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_send_scenario_runs_end_to_end(kafka_bootstrap: str, tmp_path: Path) -> None:
    # The targets are judged at 1,000 sends/s: at 50/s they are n/a, so the run exits 0.
    run = run_bench(
        tmp_path,
        kafka_bootstrap,
        "--only",
        "send",
        "--send-rate",
        "50",
        "--send-seconds",
        "0.5",
        "--send-clients",
        "5",
        timeout=180,
    )
    proc = run.proc
    (scenario,) = run.scenarios
    assert scenario["status"] == "ok", scenario["error"]
    params = scenario["params"]
    assert params["clients"] == 5
    assert params["sends"] > 0
    assert params["not_delivered"] == 0, params
    assert params["errors"] == {}, params
    assert params["kafka_consumed"] == params["kafka_records"] > 0
    assert [level["concurrency"] for level in params["max_levels"]] == [8, 24, 56]
    figures = {f["key"]: f for f in scenario["figures"]}
    assert {
        "rate",
        "delivery_p50_ms",
        "delivery_p99_ms",
        "call_p50_ms",
        "call_p99_ms",
        "max_sends_per_s",
    } <= set(figures)
    for figure in figures.values():
        assert math.isfinite(figure["value"]), figure
        assert figure["value"] >= 0, figure
    assert figures["delivery_p99_ms"]["ceiling"] is not None  # the plain Kafka figure
    assert figures["max_sends_per_s"]["value"] > 0
    assert [t["verdict"] for t in scenario["targets"]] == ["n/a", "n/a"]
    assert scenario["cpu"]["steady_sends"]
    assert "send" in proc.stdout


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_send_through_the_go_gateway_runs_end_to_end(kafka_bootstrap: str, tmp_path: Path) -> None:
    if not GO_GATEWAY.exists():
        reason = f"{GO_GATEWAY} is not built (scripts/test.sh builds examples/go-gateway)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    run = run_bench(
        tmp_path,
        kafka_bootstrap,
        "--only",
        "send-go",
        "--send-rate",
        "50",
        "--send-seconds",
        "0.5",
        "--send-clients",
        "5",
        timeout=180,
    )
    (scenario,) = run.scenarios
    assert scenario["status"] == "ok", scenario["error"]
    params = scenario["params"]
    assert params["gateway"] == str(GO_GATEWAY)
    assert params["not_delivered"] == 0, params
    assert params["errors"] == {}, params
    assert params["max_levels"] == []
    figures = {f["key"] for f in scenario["figures"]}
    assert {"delivery_p99_ms", "call_p99_ms"} <= figures
    assert "max_sends_per_s" not in figures
