"""Running the rules (conformance/rules.py) in order against one gateway: each gets a verdict,
PASS, FAIL or SKIP (asked to, a rule it builds on did not pass, or it cannot be judged here), and
the frames a failed rule left on the kit's sockets are dropped so the next rules judge only
their own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed

from conntrack.conformance.probe import NotJudged, Probe, RuleFailed
from conntrack.conformance.rules import QUIET_S, RULES, Rule, State


@dataclass(frozen=True)
class Verdict:
    rule: str
    result: str  # PASS, FAIL or SKIP
    detail: str


async def judge(
    probe: Probe, on_verdict: Callable[[Verdict], None], skip: Sequence[str] = ()
) -> list[Verdict]:
    """Every rule in order; each verdict is also handed to `on_verdict` as it comes."""
    state = State()
    verdicts: list[Verdict] = []
    failed: set[str] = set()
    async with state.stack:
        for rule in RULES:
            verdict = await _verdict(probe, state, rule, skip, failed)
            if verdict.result != "PASS":
                failed.add(rule.name)
            if verdict.result == "FAIL":
                await _drain(state)
            verdicts.append(verdict)
            on_verdict(verdict)
    return verdicts


async def _drain(state: State) -> None:
    """Drop the frames a failed rule left on the kit's sockets (a command the node should not
    have executed)."""
    for socket in state.sockets.values():
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            while True:
                await asyncio.wait_for(socket.client.recv(), QUIET_S)


async def _verdict(
    probe: Probe, state: State, rule: Rule, skip: Sequence[str], failed: set[str]
) -> Verdict:
    if rule.name in skip:
        return Verdict(rule.name, "SKIP", "skipped as asked")
    missing = [n for n in rule.needs if n in failed]
    if missing:
        return Verdict(rule.name, "SKIP", f"needs {', '.join(missing)}")
    try:
        return Verdict(rule.name, "PASS", await rule.check(probe, state))
    except RuleFailed as exc:
        return Verdict(rule.name, "FAIL", str(exc))
    except NotJudged as exc:
        return Verdict(rule.name, "SKIP", str(exc))
