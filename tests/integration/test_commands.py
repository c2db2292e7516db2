"""The commands as an operator meets them: --version and --help, flags after the subcommand, and
one clear line with a documented exit code (core/cli.py) for a bad setting, a
wrong URL scheme, an unreachable database or broker; never a traceback or an ERROR log line."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conntrack.core.settings import Settings
from tests.support.events import as_records, make_events
from tests.support.kafka import create_raw, delete_topics, publish, unique
from tests.support.ports import free_port

BIN = Path(sys.executable).parent
COMMANDS = (
    "conntrack-projector",
    "conntrack-api",
    "conntrack-producer",
    "conntrack-migrate",
    "conntrack-audit",
    "conntrack-gateway",
)


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        env=clean | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(done: subprocess.CompletedProcess[str], prog: str, *words: str) -> str:
    """The command's stderr is exactly one line, from it, saying these words."""
    err = done.stderr.strip()
    assert "Traceback" not in err, err
    assert " ERROR " not in err, err
    assert err.count("\n") == 0, err
    assert err.startswith(f"{prog}: "), err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize("prog", COMMANDS)
def test_every_command_has_a_version_and_help_naming_environment_variables(prog: str) -> None:
    done = run(prog, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(f"{prog} ")
    helped = run(prog, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "CONNTRACK_LOG_LEVEL" in helped.stdout
    assert "(default: " in helped.stdout


def test_a_bad_setting_is_one_line_naming_it_exit_2() -> None:
    done = run("conntrack-projector", env={"CONNTRACK_METRICS_PORT": "abc"})
    assert done.returncode == 2
    one_line(done, "conntrack-projector", "CONNTRACK_METRICS_PORT", "--metrics-port", "'abc'")


def test_a_database_url_without_an_async_driver_is_one_line_exit_2() -> None:
    done = run("conntrack-migrate", "upgrade", "--database-url", "postgresql://u@127.0.0.1/db")
    assert done.returncode == 2
    one_line(done, "conntrack-migrate", "CONNTRACK_DATABASE_URL", "postgresql+asyncpg://")


def test_an_unreachable_database_is_one_line_exit_69() -> None:
    url = f"postgresql+asyncpg://u:secret@127.0.0.1:{free_port()}/db"
    # The flag after the subcommand, as operators type it.
    done = run("conntrack-migrate", "upgrade", "--database-url", url)
    assert done.returncode == 69
    line = one_line(
        done, "conntrack-migrate", "cannot reach the database", "CONNTRACK_DATABASE_URL"
    )
    assert "secret" not in line
    verified = run("conntrack-audit", "verify", "--database-url", url)
    assert verified.returncode == 69
    one_line(verified, "conntrack-audit", "cannot reach the database")


@pytest.mark.parametrize(
    "args",
    [
        ("conntrack-producer", "topics"),
        ("conntrack-audit", "history", "some-id"),
        ("conntrack-audit", "as-of", "2026-01-01T00:00:00Z", "--output", "/dev/null"),
    ],
)
def test_an_unreachable_broker_is_one_line_exit_69(args: tuple[str, ...]) -> None:
    done = run(*args, "--bootstrap-servers", f"127.0.0.1:{free_port()}")
    assert done.returncode == 69
    one_line(done, args[0], "cannot reach the Kafka broker", "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS")


@pytest.mark.kafka
def test_a_topic_that_does_not_exist_is_one_line_exit_2(kafka_bootstrap: str) -> None:
    done = run(
        "conntrack-audit",
        "history",
        "x",
        "--bootstrap-servers",
        kafka_bootstrap,
        "--events-topic",
        unique("missing"),
    )
    assert done.returncode == 2
    one_line(done, "conntrack-audit", "does not exist", "CONNTRACK_EVENTS_TOPIC")


def test_json_logs_are_one_object_a_line() -> None:
    proc = subprocess.Popen(
        [str(BIN / "conntrack-projector")],
        env={k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")}
        | {
            "CONNTRACK_LOG_FORMAT": "json",
            "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
            "CONNTRACK_DATABASE_URL": "sqlite+aiosqlite:///:memory:",
        },
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline() for _ in range(3)]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
        rc = proc.returncode
    assert "Traceback" not in rest, rest
    records = [json.loads(line) for line in lines]
    assert records[0]["event"] == "starting"
    assert records[1]["event"] == "retry"
    assert records[1]["cause"] == "broker"
    assert records[1]["level"] == "WARNING"
    assert rc == 0


@pytest.mark.kafka
@pytest.mark.slow
async def test_sigterm_stops_a_rebuild_and_says_what_is_kept(
    kafka_settings: Settings, database_url: str
) -> None:
    events = make_events(random.Random(31), "st", 3000, 300)
    await publish(
        kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic, as_records(events)
    )
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "conntrack-audit"),
        "rebuild",
        "--bootstrap-servers",
        kafka_settings.kafka_bootstrap_servers,
        "--events-topic",
        kafka_settings.events_topic,
        "--database-url",
        database_url,
        "--batch-events",
        "100",
        "--max-events-per-second",
        "500",
        "--progress-interval",
        "0",  # a line per batch
        env={k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")},
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    # Under way (3000 records at 500/s take 6 s) once it reports its first batch: a fixed sleep
    # could signal a process still importing, which SIGTERM simply kills.
    assert proc.stderr is not None
    first = await asyncio.wait_for(proc.stderr.readline(), 60)
    assert first.startswith(b"rebuild: "), first
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130
    assert "the shadow tables keep every committed batch" in err.decode()
    assert "Traceback" not in err.decode()


@pytest.mark.kafka
@pytest.mark.parametrize("clock", ["CreateTime", "LogAppendTime"])
async def test_as_of_says_when_its_cut_follows_the_gateways_clocks(
    kafka_bootstrap: str, tmp_path: Path, clock: str
) -> None:
    """An events topic stamped with the producers' clocks still gets an answer, with a note on
    stderr that it is not exactly what the log held at T; a LogAppendTime topic gets none."""
    topic = unique(f"events-{clock}")
    await create_raw(kafka_bootstrap, topic, {"message.timestamp.type": clock})
    try:
        done = await asyncio.to_thread(
            run,
            "conntrack-audit",
            "as-of",
            "2026-01-01T00:00:00Z",
            "--bootstrap-servers",
            kafka_bootstrap,
            "--events-topic",
            topic,
            "--output",
            str(tmp_path / "as-of.db"),
            "--format",
            "json",
        )
    finally:
        await delete_topics(kafka_bootstrap, [topic])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["timestamp_type"] == clock
    note = [line for line in done.stderr.splitlines() if line.startswith("note: ")]
    if clock == "LogAppendTime":
        assert note == []
    else:
        assert len(note) == 1, done.stderr
        assert "gateways' clocks" in note[0]
