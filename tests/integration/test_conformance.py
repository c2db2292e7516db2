"""`conntrack-conformance` against real gateway nodes on real Kafka: the reference gateway and the
Go gateway (examples/go-gateway, written from the schemas alone) keep every rule of the node
role, and a gateway that breaks one rule (tests/support/faulty_gateway.py, one fault at a time)
fails exactly that rule, with the kit exiting 1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

from conntrack.core.settings import Settings
from tests.support.gateway import GATEWAY, GatewayProcess, with_command_topics
from tests.support.kafka import unique
from tests.support.ports import free_port
from tests.support.repo import REPO

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

KIT = Path(sys.executable).parent / "conntrack-conformance"
GO_GATEWAY = REPO / ".local" / "go" / "bin" / "conntrack-go-gateway"
ALL_RULES = 16
# A gateway under a loop that starts it again whenever it exits; the restart rule's command
# stops the running one (its pid is in the file the loop writes).
RESTART_LOOP = 'while :; do "$0" & echo $! > "$1"; wait $!; sleep 0.2; done'


def gateway_argv(which: str) -> tuple[str, ...]:
    if which == "python":
        return (str(GATEWAY),)
    if not GO_GATEWAY.exists():
        reason = f"{GO_GATEWAY} is not built (scripts/test.sh builds examples/go-gateway)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return (str(GO_GATEWAY),)


async def judge(
    settings: Settings, gateway: GatewayProcess, timeout_s: float, *extra: str
) -> tuple[int, str]:
    """Run the kit against the gateway; its exit code and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")}
    env.update(
        CONNTRACK_KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        CONNTRACK_EVENTS_TOPIC=settings.events_topic,
        CONNTRACK_COMMANDS_TOPIC=settings.commands_topic,
        CONNTRACK_COMMAND_OUTCOMES_TOPIC=settings.command_outcomes_topic,
    )
    kit = await asyncio.create_subprocess_exec(
        str(KIT),
        "--ws-url",
        gateway.url,
        "--node-id",
        gateway.node_id,
        "--timeout",
        str(timeout_s),
        *extra,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(kit.communicate(), 300)
    assert kit.returncode is not None
    return kit.returncode, out.decode()


def verdicts(output: str) -> dict[str, str]:
    lines = [line.split(maxsplit=2) for line in output.splitlines()]
    return {parts[1]: parts[0] for parts in lines if parts and parts[0] in ("PASS", "FAIL", "SKIP")}


@pytest.mark.parametrize("which", ["python", "go"])
async def test_both_gateways_keep_every_rule(
    kafka_settings: Settings, tmp_path: Path, which: str
) -> None:
    pidfile = tmp_path / "gateway.pid"
    async with with_command_topics(kafka_settings) as settings:
        gateway = GatewayProcess(
            settings,
            unique("node"),
            tmp_path / "gw.log",
            1.0,
            # A fixed port: the restarted gateway listens where the first one did.
            env={"CONNTRACK_GATEWAY_LISTEN": f"127.0.0.1:{free_port()}"},
            argv=("bash", "-c", RESTART_LOOP, *gateway_argv(which), str(pidfile)),
        )
        try:
            await gateway.start()
            restart = f"kill -TERM $(cat {pidfile})"
            code, output = await judge(settings, gateway, 15, "--restart-command", restart)
        finally:
            # The loop first (it starts no other), then the gateway it runs, which holds the
            # output the loop's process is only done with once it is closed.
            if gateway.process is not None:
                gateway.process.send_signal(signal.SIGKILL)
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            await gateway.close()
    assert code == 0, output
    assert list(verdicts(output).values()) == ["PASS"] * ALL_RULES, output
    assert output.splitlines()[-1] == f"{ALL_RULES} rules: {ALL_RULES} passed, 0 failed, 0 skipped"


# Each fault, the rules it breaks (a rule of sockets breaks broadcast's as well), and the rules
# then not judged because they build on a broken one (and restart: no command is given).
@pytest.mark.parametrize(
    ("fault", "broken", "not_judged"),
    [
        ("text-as-binary", {"send-text", "duplicate", "broadcast"}, {"client-close", "restart"}),
        ("close-code-ignored", {"disconnect", "disconnect-many"}, {"restart"}),
        ("unknown-as-done", {"unknown-connection", "broadcast"}, {"client-close", "restart"}),
        ("expired-executed", {"expired"}, {"restart"}),
        ("duplicates-executed", {"duplicate"}, {"restart"}),
        ("fence-ignored", {"fencing"}, {"restart"}),
    ],
)
async def test_a_broken_rule_fails(
    kafka_settings: Settings, tmp_path: Path, fault: str, broken: set[str], not_judged: set[str]
) -> None:
    async with with_command_topics(kafka_settings) as settings:
        gateway = GatewayProcess(
            settings,
            unique("node"),
            tmp_path / "gw.log",
            1.0,
            argv=(sys.executable, "-m", "tests.support.faulty_gateway", fault),
        )
        try:
            await gateway.start()
            code, output = await judge(settings, gateway, 4)
        finally:
            await gateway.close()
    assert code == 1, output
    found = verdicts(output)
    assert len(found) == ALL_RULES, output
    assert {rule for rule, v in found.items() if v == "FAIL"} == broken, output
    assert {rule for rule, v in found.items() if v == "SKIP"} == not_judged, output
