"""The label-upkeep benchmark scenario (figure 1e) keeps working: run at a tiny scale against the
real broker and PostgreSQL, it projects the labelled churn mix beside the same mix without labels
and reports both rates. The values are not checked: a timing never decides pass or fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import KAFKA
from tests.support.bench import run_bench


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_labels_scenario_reports_the_labelled_rate_beside_the_plain_one(tmp_path: Path) -> None:
    run = run_bench(tmp_path, KAFKA, "--only", "projector-labels", timeout=240)
    (scenario,) = run.scenarios
    assert scenario["status"] == "ok", scenario["error"]
    (figure,) = scenario["figures"]
    assert figure["key"] == "labelled_events_per_s"
    assert figure["value"] > 0
    assert figure["ceiling"] > 0
    runs = scenario["params"]["runs"]
    assert [r["mix"] for r in runs] == ["churn-heavy", "churn-heavy, labelled"]
    assert runs[0]["events"] == runs[1]["events"] > 0
    assert runs[0]["rows"] == runs[1]["rows"] > 0
