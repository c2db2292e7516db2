"""docker/projector_healthcheck.py, the projector's compose healthcheck, says whether it consumes.

The script runs here exactly as the container runs it (a separate interpreter, the port from
CONNTRACK_METRICS_PORT), against a stand-in metrics page whose text each test sets.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "projector_healthcheck.py"


class _Page(http.server.BaseHTTPRequestHandler):
    text = ""

    def do_GET(self) -> None:
        body = type(self).text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Check:
    port: int
    state: Path
    page: type[_Page]

    def run(self, metrics: str) -> tuple[int, str]:
        self.page.text = metrics
        done = subprocess.run(
            [sys.executable, str(SCRIPT)],
            env={
                "CONNTRACK_METRICS_PORT": str(self.port),
                "CONNTRACK_HEALTHCHECK_STATE": str(self.state),
            },
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return done.returncode, done.stdout + done.stderr


@pytest.fixture
def check(tmp_path: Path) -> Iterator[Check]:
    page = type("Page", (_Page,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Check(server.server_address[1], tmp_path / "state.json", page)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def metrics(
    *, assigned: int | None = 3, lags: tuple[int, ...] = (0, 0, 0), batches: int = 7
) -> str:
    lines = []
    if assigned is not None:
        lines += [
            "# HELP conntrack_projector_assigned_partitions Partitions owned.",
            "# TYPE conntrack_projector_assigned_partitions gauge",
            f"conntrack_projector_assigned_partitions {assigned}.0",
        ]
    lines += [
        "# HELP conntrack_projector_batches_total Batches committed.",
        "# TYPE conntrack_projector_batches_total counter",
        f"conntrack_projector_batches_total {batches}.0",
        "conntrack_projector_batches_created 1.7e+09",
        "# HELP conntrack_projector_lag Records behind.",
        "# TYPE conntrack_projector_lag gauge",
    ]
    lines += [
        f'conntrack_projector_lag{{partition="{p}",topic="conntrack.events.v1"}} {lag}.0'
        for p, lag in enumerate(lags)
    ]
    return "\n".join(lines) + "\n"


def test_consuming_and_caught_up_is_healthy(check: Check) -> None:
    assert check.run(metrics())[0] == 0
    assert check.run(metrics())[0] == 0  # no lag: nothing to commit is no sign of trouble


def test_no_partitions_is_unhealthy(check: Check) -> None:
    code, out = check.run(metrics(assigned=0))
    assert code == 1
    assert "assigned_partitions" in out
    assert check.run(metrics(assigned=None))[0] == 1


def test_lag_without_committed_batches_is_stuck(check: Check) -> None:
    # The first check has nothing to compare with.
    assert check.run(metrics(lags=(0, 40, 0), batches=7))[0] == 0
    # Batches committed since: working through the lag.
    assert check.run(metrics(lags=(0, 25, 3), batches=9))[0] == 0
    # Still lagging, not one batch since the previous check: stuck.
    code, out = check.run(metrics(lags=(0, 25, 3), batches=9))
    assert code == 1
    assert "stuck" in out
    # It recovers as soon as batches commit again.
    assert check.run(metrics(lags=(0, 2, 0), batches=10))[0] == 0


def test_unanswered_page_is_unhealthy(check: Check, tmp_path: Path) -> None:
    closed = http.server.HTTPServer(("127.0.0.1", 0), _Page)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there now
    code, out = Check(port, tmp_path / "other.json", _Page).run("")
    assert code == 1
    assert "no metrics from" in out


def test_a_page_that_is_not_the_projectors_is_unhealthy(check: Check) -> None:
    assert check.run("# TYPE something_else gauge\nsomething_else 1.0\n")[0] == 1
    assert check.run("<html>not prometheus</html>\n")[0] == 1
