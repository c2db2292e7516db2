"""The get-rest benchmark scenario (figure 3c) keeps working: run at a tiny scale against the
real PostgreSQL server, it reports REST figures beside gRPC ones from the same server. The
values are not checked: a timing never decides pass or fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import KAFKA
from tests.support.bench import run_bench


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_get_rest_scenario_reports_rest_beside_grpc(tmp_path: Path) -> None:
    run = run_bench(tmp_path, KAFKA, "--only", "get-rest", "--get-seconds", "0.5", timeout=240)
    proc = run.proc
    (scenario,) = run.scenarios
    assert scenario["status"] == "ok", scenario["error"]
    figures = {f["key"]: f for f in scenario["figures"]}
    assert set(figures) == {"rest_qps", "rest_p50_ms", "rest_p99_ms", "rest_server_cpu_ms_per_call"}
    assert figures["rest_qps"]["value"] > 0
    assert figures["rest_qps"]["ceiling"] > 0  # the gRPC Get of the same server
    assert [run["path"] for run in scenario["params"]["runs"]] == ["gRPC", "REST"]
    assert all(run["statuses"].get("OK", 0) > 0 for run in scenario["params"]["runs"])
    assert "get-rest" in proc.stdout
