"""`python -m bench soak` (bench/soak.py) keeps working: its verdict rules on made-up series,
its log counting, and a ~18-second run against the real Kafka and PostgreSQL that must write
the JSON series and a PNG beside it. No measured value decides pass or fail, only the shape
(a busy machine may well miss the verdict in 18 seconds)."""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.loadgen import find_ghz
from bench.soak import SCHEMA, SoakParams, _LogWatch, parse_duration, verdict
from tests.conftest import POSTGRES_URL

REPO = Path(__file__).resolve().parents[2]


def test_durations_read_as_seconds() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("20s") == 20
    assert parse_duration("1.5m") == 90
    assert parse_duration("1h") == 3600
    for bad in ("", "m", "-1s", "0", "1d", "1 minute"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


def test_warmup_and_compare_window_follow_the_run_length() -> None:
    hour = SoakParams()
    assert (hour.intervals, hour.warmup_intervals) == (60, 5)
    short = SoakParams(minutes=3, interval_s=20)
    assert (short.intervals, short.warmup_intervals) == (9, 2)  # a fifth of 3 min = 36 s
    assert SoakParams(minutes=1, interval_s=20, warmup_s=600).warmup_intervals == 2  # keeps one


def _rows(
    projector_rss: list[float], lag: list[int], errors: int = 0, warmup: int = 2
) -> list[dict[str, Any]]:
    return [
        {
            "warmup": i < warmup,
            "projector_rss_mb": rss,
            "api_rss_mb": 100.0,
            "lag_max": lag[i],
            "log": {
                "projector": {"errors": errors if i == 0 else 0, "warnings": 1},
                "api": {"errors": 0, "warnings": 0},
            },
        }
        for i, rss in enumerate(projector_rss)
    ]


def test_verdict_compares_medians_after_the_warmup() -> None:
    params = SoakParams(minutes=10, interval_s=60, warmup_s=120, compare=3, rate=1000)
    # The warm-up's climb (50 -> 90) does not count; 100 -> 109 is 9%: met.
    steady = _rows([50, 90, 100, 99, 101, 104, 108, 109, 200, 109], [9_000, 9_000, *[500] * 8])
    v = verdict(steady, params)
    assert v["compare_intervals"] == 3
    assert v["rss"]["projector"]["first_median_mb"] == 100
    assert v["rss"]["projector"]["last_median_mb"] == 109  # the one spike to 200 is no median
    assert v["rss"]["projector"]["met"] is True
    assert v["lag"]["met"] is True
    assert v["logs"] == {"errors": 0, "warnings": 10, "met": True}
    assert v["met"] is True

    growing = _rows([50, 90, 100, 100, 100, 105, 110, 111, 112, 112], [0] * 10)
    assert verdict(growing, params)["rss"]["projector"]["met"] is False  # +11%
    assert verdict(growing, params)["met"] is False


def test_lag_trends_up_only_beyond_its_own_size_and_a_second_of_traffic() -> None:
    params = SoakParams(minutes=8, interval_s=60, warmup_s=60, compare=2, rate=1000)
    rss = [100.0] * 8
    # 200 -> 900: more than doubled, but less than a second of traffic (1,000) above: bounded.
    bounded = verdict(_rows(rss, [0, 200, 200, 400, 600, 700, 900, 900], warmup=1), params)
    assert bounded["lag"]["met"] is True
    climbing = verdict(
        _rows(rss, [0, 2_000, 2_000, 4_000, 6_000, 8_000, 9_000, 9_500], 0, 1), params
    )
    assert climbing["lag"]["trends_up"] is True
    assert climbing["lag"]["max"] == 9_500
    assert climbing["lag"]["max_seconds_of_traffic"] == 9.5
    assert climbing["met"] is False


def test_one_error_line_fails_the_verdict() -> None:
    params = SoakParams(minutes=4, interval_s=60, warmup_s=60)
    v = verdict(_rows([100.0] * 4, [0] * 4, errors=1, warmup=1), params)
    assert v["logs"]["met"] is False
    assert v["met"] is False


def test_too_short_a_run_cannot_be_judged() -> None:
    params = SoakParams(minutes=2, interval_s=60, warmup_s=60)
    v = verdict(_rows([100.0, 100.0], [0, 0], warmup=1), params)
    assert v["rss"]["projector"]["met"] is None
    assert v["met"] is None


def test_log_watch_counts_new_complete_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    log.write_text(
        "2026-11-30 23:53:46,566 WARNING api.commands: event=retry\n"
        "2026-11-30 23:53:47,001 INFO api: event=started\n"
        "2026-11-30 23:53:48,002 ERROR projector: event=batch_failed\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1\n'
        "2026-11-30 23:53:49,003 CRITICAL proj"  # not finished yet
    )
    watch = _LogWatch(log)
    assert watch.scan() == {"errors": 2, "warnings": 1}
    with log.open("a") as f:
        f.write("ector: event=gone\n2026-11-30 23:53:50,000 WARNING x: y\n")
    assert watch.scan() == {"errors": 1, "warnings": 1}
    assert watch.scan() == {"errors": 0, "warnings": 0}
    assert len(watch.samples) == 3
    assert watch.samples[2].endswith("CRITICAL projector: event=gone")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(120)
# python: the Get load process of bench/soak.py (what runs where ghz is not installed); ghz: one
# ghz run per interval.
@pytest.mark.parametrize("generator", ["python", "ghz"])
def test_a_short_soak_writes_the_series_and_the_plot(
    kafka_bootstrap: str, tmp_path: Path, generator: str
) -> None:
    if generator == "ghz" and find_ghz() is None:
        pytest.skip("ghz is not installed (go install github.com/bojand/ghz/cmd/ghz@latest)")
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "soak",
            "--minutes",
            "0.3",
            "--interval",
            "3s",
            "--warmup",
            "3s",
            "--rate",
            "500",
            "--get-rate",
            "100",
            "--get-concurrency",
            "4",
            "--resident",
            "200",
            "--load-generator",
            generator,
            "--out",
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
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA
    assert doc["complete"] is True
    rows = doc["intervals"]
    assert [r["index"] for r in rows] == list(range(6))
    assert [r["warmup"] for r in rows] == [True] + [False] * 5
    for row in rows:
        assert row["projector_rss_mb"] > 0
        assert row["api_rss_mb"] > 0
        assert row["events_sent_per_s"] > 0
        assert row["lag_max"] >= 0
        assert set(row["log"]) == {"projector", "api"}
        assert {"projector", "api", "producer", "get_load", "machine"} <= set(row["cpu_cores"])
    # Calls were answered, from the resident connections: OK, never NOT_FOUND.
    assert sum(r["get_statuses"].get("OK", 0) for r in rows) > 0
    assert not any(set(r["get_statuses"]) & {"NOT_FOUND", "NotFound"} for r in rows)
    assert any(r["get_p99_ms"] is not None for r in rows)
    assert sum(r["probes_visible"] for r in rows) > 0
    assert any(r["freshness_p99_ms"] is not None for r in rows)
    v = doc["verdict"]
    assert {"rss", "lag", "logs", "met"} <= set(v)
    assert set(v["rss"]) == {"projector", "api"}
    assert "overall:" in proc.stdout
    width, height = _png_size(out.with_suffix(".png"))
    assert width > 500
    assert height > 500
