"""A SIGTERM while a service is still waiting for its broker (an operator stopping a deployment
that never came up) ends it at once and cleanly: exit 0, one line saying it stopped before it
started, no ERROR line (aiokafka's "Unclosed AIOKafkaConsumer" among them) and no traceback; the
wait itself is told once, not at every attempt."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.support.ports import free_port

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("command", "starting"),
    [
        (["conntrack-projector"], "event=starting"),
        (["conntrack-gateway"], "unreachable for"),
    ],
)
async def test_a_sigterm_before_the_broker_is_reached_exits_cleanly(
    command: list[str], starting: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        # Nothing listens there: the start waits for the broker, retrying.
        "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "CONNTRACK_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'readmodel.db'}",
        "CONNTRACK_GATEWAY_LISTEN": f"127.0.0.1:{free_port()}",
        "CONNTRACK_GATEWAY_SPOOL_DIR": str(tmp_path / "spool"),
    }
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            str(BIN / command[0]), *command[1:], env=env, stdout=err, stderr=err
        )
        deadline = time.monotonic() + 30
        while starting not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # a retry or two
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
        took = time.monotonic() - started
    output = log.read_text(errors="replace")
    assert code == 0, output
    assert took < 5, output
    assert "event=abandoned_start" in output, output
    assert " ERROR " not in output, output
    assert "Traceback" not in output, output
    # The broker's absence is told once (then once a minute), not at every attempt.
    assert output.count("unreachable for") <= 1, output
