"""The people benchmark scenario (figure 9) keeps working: run at a tiny scale against the real
PostgreSQL server, it reports the by-principal and by-selector pages beside the unfiltered one.
The values are not checked: a timing never decides pass or fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import KAFKA
from tests.support.bench import run_bench


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_people_scenario_reports_principal_and_selector_pages(tmp_path: Path) -> None:
    run = run_bench(tmp_path, KAFKA, "--only", "people", timeout=240)
    (scenario,) = run.scenarios
    assert scenario["status"] == "ok", scenario["error"]
    figures = {f["key"]: f for f in scenario["figures"]}
    assert set(figures) == {
        "principal_p50_ms",
        "principal_p99_ms",
        "selector_p50_ms",
        "selector_p99_ms",
    }
    assert figures["principal_p99_ms"]["ceiling"] > 0  # the unfiltered page, same run
    assert [t["verdict"] for t in scenario["targets"]] == ["n/a"]  # judged at full size only
    assert "ix_connections_principal" in "\n".join(scenario["notes"])
    assert "ix_connection_labels_gateway_id" in "\n".join(scenario["notes"])
