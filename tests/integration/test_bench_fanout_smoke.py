"""The fanout benchmark scenario (figure 10) keeps working: run at a tiny scale on the real broker
and PostgreSQL server, three gateway nodes and their clients, it reports the selector Send beside
the loop of single Sends. The values are not checked: a timing never decides pass or fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import KAFKA
from tests.support.bench import run_bench


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_fanout_scenario_reports_the_selector_send_beside_single_sends(tmp_path: Path) -> None:
    run = run_bench(tmp_path, KAFKA, "--only", "fanout", timeout=240)
    (scenario,) = run.scenarios
    assert scenario["status"] == "ok", scenario["error"]
    figures = {f["key"]: f for f in scenario["figures"]}
    assert set(figures) == {
        "selector_send_median_s",
        "selector_send_max_s",
        "selector_targets_walk_median_s",
    }
    assert figures["selector_targets_walk_median_s"]["value"] > 0
    assert set(scenario["params"]["table_statistics"]) == {"connections", "connection_labels"}
    assert figures["selector_send_median_s"]["ceiling"] > 0  # the loop of single Sends
    connections = scenario["params"]["connections"]
    assert all(a["done"] == connections for a in scenario["params"]["answers"])
    assert scenario["params"]["loop_errors"] == 0
    assert [t["verdict"] for t in scenario["targets"]] == ["n/a"]
