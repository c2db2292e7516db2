"""The get-workers bench scenario (figure 3b) keeps working: at a tiny scale against the real
PostgreSQL, both servers with one process and with one per core, figures and a target verdict
in the JSON. The values are not checked: a timing never decides pass or fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api.workers import available_cores
from tests.conftest import POSTGRES_URL

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_get_workers_scenario_runs(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            "--scale",
            "0.001",
            "--only",
            "get-workers",
            "--get-seconds",
            "0.5",
            "--load-generator",
            "python",
            "--json",
            str(out),
            "--kafka",
            kafka_bootstrap,
            "--postgres-url",
            POSTGRES_URL,
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (scenario,) = json.loads(out.read_text())["scenarios"]
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
