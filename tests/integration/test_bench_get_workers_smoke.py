"""The get-workers bench scenario (figure 3b) keeps working: at a tiny scale against the real
PostgreSQL, both servers with one process and with one per core, figures and a target verdict
in the JSON. The values are not checked: a timing never decides pass or fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from conntrack.api.process.cores import available_cores
from tests.support.bench import run_bench


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_get_workers_scenario_runs(kafka_bootstrap: str, tmp_path: Path) -> None:
    run = run_bench(
        tmp_path,
        kafka_bootstrap,
        "--only",
        "get-workers",
        "--get-seconds",
        "0.5",
        "--load-generator",
        "python",
        timeout=280,
    )
    (scenario,) = run.scenarios
    assert scenario["status"] == "ok", scenario["error"]
    cores = available_cores()
    counts = sorted({1, cores})
    keys = {f["key"] for f in scenario["figures"]}
    assert {f"qps_{n}_workers" for n in counts} <= keys
    assert all(f["value"] > 0 and f["ceiling"] > 0 for f in scenario["figures"])
    assert scenario["params"]["workers"] == counts
    assert {f"conntrack-api x{n} max" for n in counts} <= set(scenario["cpu"])
    (target,) = scenario["targets"]
    assert target["verdict"] in ("met", "NOT met")
