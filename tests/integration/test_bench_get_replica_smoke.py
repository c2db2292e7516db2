"""The get-replica bench scenario keeps working: at a tiny scale, the API of figure 3 reads from
a streaming replica of the test PostgreSQL server that the scenario starts with
infra/postgres.sh and stops again. The values are not checked: a timing never decides pass or
fail."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_URL
from tests.support.bench import REPO, run_bench


def _replica_status() -> int:
    port = make_url(POSTGRES_URL).port or 5432
    return subprocess.run(
        ["bash", str(REPO / "infra" / "postgres.sh"), "replica", "status"],
        env={**os.environ, "CONNTRACK_PG_PORT": str(port)},
        capture_output=True,
    ).returncode


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_get_replica_scenario_reads_from_a_replica_it_starts_and_stops(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    if make_url(POSTGRES_URL).host not in ("127.0.0.1", "localhost"):
        pytest.skip("the scenario starts a replica only of the project's own local server")
    if _replica_status() == 0:
        pytest.skip("a replica of the test server is already running (not this test's to stop)")
    run = run_bench(
        tmp_path,
        kafka_bootstrap,
        "--only",
        "get-replica",
        "--get-seconds",
        "0.5",
        "--load-generator",
        "python",
        timeout=280,
    )
    (scenario,) = run.scenarios
    assert scenario["status"] == "ok", scenario["error"]
    assert scenario["params"]["read_replica"] is True
    keys = {f["key"] for f in scenario["figures"]}
    assert {"qps", "p99_half_load_ms"} <= keys
    assert _replica_status() == 3  # removed again: it made it
