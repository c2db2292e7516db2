"""The projector-ceilings bench scenario (BENCHMARKS.md, 1d) keeps working: run it at a tiny
scale against the real Kafka and PostgreSQL and check that it produced the ceilings and the
projector's figure for every store path, with the server's commit settings beside each. The
values are not checked: a timing never decides pass or fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from conntrack.core.store import PG_BULK_PATHS
from tests.support.bench import run_bench

SHOWN = ("synchronous_commit", "fsync", "full_page_writes", "wal_level")


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_ceilings_scenario_writes_both_ceilings_per_path_and_the_settings(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    run = run_bench(
        tmp_path, kafka_bootstrap, "--only", "projector-ceilings", scale="0.002", timeout=240
    )
    proc, doc = run.proc, run.report
    settings = doc["meta"]["postgres_settings"]
    assert set(settings) == set(SHOWN)
    assert "PostgreSQL: synchronous_commit=" in proc.stdout
    (scenario,) = doc["scenarios"]
    assert scenario["status"] == "ok", scenario["error"]
    assert scenario["params"]["server_settings"] == settings
    assert scenario["params"]["rows_upserted"] > 0
    figures = {f["key"]: f for f in scenario["figures"]}
    # With the server committing synchronously the scenario also runs with it off.
    modes = ["server"] if settings["synchronous_commit"] == "off" else ["server", "async"]
    for path in PG_BULK_PATHS:
        for mode in modes:
            db = figures[f"db_only_events_per_s_{path}_{mode}"]
            projector = figures[f"projector_events_per_s_{path}_{mode}"]
            assert db["value"] > 0
            assert projector["value"] > 0
            # The projector is set beside the lower of its two ceilings.
            assert projector["ceiling"] == pytest.approx(min(db["value"], db["ceiling"]))
            expected = "off" if mode == "async" else settings["synchronous_commit"]
            for figure in (db, projector):
                assert f"synchronous_commit={expected}," in figure["note"]
                assert "µs/event" in figure["note"]
    assert len(scenario["targets"]) == len(PG_BULK_PATHS) * len(modes)
