"""core/liveness.py: when an open connection is gone although no Disconnected
says so."""

from __future__ import annotations

from conntrack.core.fold import NodeState
from conntrack.core.liveness import Liveness

S = 1_000_000_000
NOW = 1_764_300_000 * S
LEASE = Liveness(node_lease_ns=30 * S)


def node(incarnation: int, last_seen: int) -> dict[str, NodeState]:
    return {"n": NodeState("n", incarnation, NOW - 100 * S, last_seen, "gw")}


def gone(rules: Liveness, nodes: dict[str, NodeState], **conn: object) -> str | None:
    fields: dict[str, object] = {
        "node_id": "n",
        "node_incarnation": 2,
        "connected_at_ns": NOW - 60 * S,
        "last_active_at_ns": NOW - 10 * S,
    } | conn
    return rules.gone(nodes=nodes, now_ns=NOW, **fields)  # type: ignore[arg-type]


def test_a_node_heard_from_within_the_lease_keeps_its_connections() -> None:
    assert gone(LEASE, node(2, NOW - 29 * S)) is None


def test_a_silent_node_loses_its_connections_after_the_lease() -> None:
    assert gone(LEASE, node(2, NOW - 31 * S)) == "node lost"


def test_a_node_started_again_loses_its_older_connections_at_once() -> None:
    assert gone(LEASE, node(3, NOW)) == "node restarted"


def test_a_newer_incarnation_not_yet_in_the_read_model_is_not_judged_by_the_older() -> None:
    assert gone(LEASE, node(1, NOW - 3600 * S)) is None


def test_a_node_not_yet_in_the_read_model_and_a_connection_without_one_are_live() -> None:
    assert gone(LEASE, {}) is None
    assert gone(LEASE, node(9, NOW), node_id=None, node_incarnation=None) is None


def test_a_lease_of_zero_never_judges_silence() -> None:
    assert gone(Liveness(node_lease_ns=0), node(2, NOW - 3600 * S)) is None
    assert gone(Liveness(node_lease_ns=0), node(3, NOW)) == "node restarted"


def test_idle_timeout_and_maximum_lifetime() -> None:
    rules = Liveness(node_lease_ns=0, idle_timeout_ns=60 * S, max_lifetime_ns=3600 * S)
    assert gone(rules, {}, last_active_at_ns=NOW - 59 * S) is None
    assert gone(rules, {}, last_active_at_ns=NOW - 61 * S) == "idle"
    assert gone(rules, {}, connected_at_ns=NOW - 3601 * S) == "lifetime"
    assert Liveness.of_seconds(30, 60, 0) == Liveness(30 * S, 60 * S, 0)


def test_a_fenced_incarnation_stays_lost_when_its_node_is_heard_from_again() -> None:
    fenced = {"n": NodeState("n", 2, NOW - 100 * S, NOW, "gw", 2, NOW - 5 * S)}
    assert gone(LEASE, fenced) == "node lost"
    assert gone(LEASE, fenced, node_incarnation=3) is None
    bounds = LEASE.bounds(fenced, NOW)
    assert bounds.node_floor("n") == 3
    # A fence of an older incarnation does not lower the floor of a lost newer one.
    lost_newer = {"n": NodeState("n", 4, NOW - 100 * S, NOW - 31 * S, "gw", 2, NOW - 50 * S)}
    assert LEASE.bounds(lost_newer, NOW).node_floor("n") == 5
