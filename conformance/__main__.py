"""conntrack-conformance: judge a running gateway node against the rules of the node role.

It opens WebSocket clients of the gateway, reads the events topic, sends commands to the node as
the API does and reads their outcomes, and prints one line per rule: PASS, FAIL (and what went
wrong) or SKIP. Exit 0 when no rule failed, 1 when one did. Point it at a gateway that nobody
else uses meanwhile: it closes the sockets it opens and, with the fencing rule, makes the node
start a new incarnation."""

from __future__ import annotations

import argparse
import sys

from conntrack.conformance.judge import Verdict, judge
from conntrack.conformance.probe import KitBroken, NotJudged, Probe
from conntrack.conformance.rules import RULES
from conntrack.core import cli
from conntrack.core.settings import Settings


def _print(verdict: Verdict) -> None:
    print(f"{verdict.result} {verdict.rule:<{_WIDTH}} {verdict.detail}", flush=True)


_WIDTH = max(len(rule.name) for rule in RULES)


async def run(settings: Settings, ns: argparse.Namespace) -> int:
    try:
        async with Probe(settings, ns.ws_url, ns.node_id, ns.timeout, ns.restart_command) as probe:
            verdicts = await judge(probe, _print, skip=ns.skip)
    except NotJudged as exc:
        raise cli.CommandError(str(exc), cli.Exit.USAGE) from None
    except KitBroken as exc:
        raise cli.CommandError(str(exc), cli.Exit.UNAVAILABLE) from None
    failed = sum(v.result == "FAIL" for v in verdicts)
    passed = sum(v.result == "PASS" for v in verdicts)
    print(
        f"{len(verdicts)} rules: {passed} passed, {failed} failed, "
        f"{len(verdicts) - passed - failed} skipped",
        flush=True,
    )
    return cli.Exit.NEGATIVE if failed else cli.Exit.OK


def main(argv: list[str] | None = None) -> None:
    prog = "conntrack-conformance"
    parser = cli.parser(prog, __doc__, ("kafka", "logging"))
    parser.add_argument("--ws-url", required=True, help="the gateway's WebSocket URL")
    parser.add_argument("--node-id", required=True, help="the gateway node's id")
    parser.add_argument(
        "--timeout", type=float, default=15.0, help="how long each expected thing is waited for (s)"
    )
    parser.add_argument(
        "--restart-command",
        default="",
        metavar="COMMAND",
        help="a shell command that restarts the gateway (on the same URL), for the restart "
        "rule; without it the rule is skipped",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=[rule.name for rule in RULES],
        metavar="RULE",
        help="do not judge this rule (repeatable); the rules: "
        + ", ".join(rule.name for rule in RULES),
    )
    ns = parser.parse_args(argv)
    if ns.timeout <= 0:
        parser.error("--timeout must be positive")
    settings = cli.start(prog, ns, gen0_threshold=None, log_level="WARNING")
    cli.run(prog, lambda: run(settings, ns), settings)


if __name__ == "__main__":
    main()
    sys.exit(0)
