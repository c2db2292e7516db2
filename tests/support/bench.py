"""Running the benchmark harness (python -m bench run) at a tiny scale, as the bench smoke tests
do: one home for the command line they share (the real broker and PostgreSQL, a work directory
and the JSON report in the test's tmp_path)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import POSTGRES_URL

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BenchRun:
    proc: subprocess.CompletedProcess[str]
    report: dict[str, Any]

    @property
    def scenarios(self) -> list[dict[str, Any]]:
        scenarios: list[dict[str, Any]] = self.report["scenarios"]
        return scenarios


def run_bench(
    tmp_path: Path, kafka: str, *args: str, scale: str = "0.001", timeout: float = 240
) -> BenchRun:
    """Run `python -m bench run --scale SCALE ARGS...` against the test services; the run must
    exit 0 (its output is the assertion message otherwise)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            "--scale",
            scale,
            *args,
            "--json",
            str(out),
            "--kafka",
            kafka,
            "--postgres-url",
            POSTGRES_URL,
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return BenchRun(proc, json.loads(out.read_text()))
