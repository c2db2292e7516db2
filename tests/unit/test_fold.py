"""The fold is a join-semilattice: order, duplicates and batch splits do not change the state."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conntrack.core.events import (
    Activity,
    Connected,
    Disconnected,
    Event,
    EventTuple,
    NodeFenced,
    NodeHeartbeat,
    NodeStarted,
    Payload,
)
from conntrack.core.fold import (
    ConnectionState,
    NodeState,
    apply,
    fold,
    fold_nodes,
    fold_tuples,
    merge,
    merge_nodes,
    of_event,
)

T0 = 1_764_300_000_000_000_000

connection_ids = st.sampled_from(["c1", "c2", "c3"])
times = st.integers(min_value=T0, max_value=T0 + 50)  # narrow: many ties
event_ids = st.sampled_from([f"e{i}" for i in range(12)])  # few: colliding ids happen
payloads: st.SearchStrategy[Payload] = st.one_of(
    st.builds(Connected, st.sampled_from(["10.0.0.1", "::1"]), st.sampled_from(["ua1", "ua2"])),
    # The same Connected from two nodes or two starts of one: still one order.
    st.builds(
        Connected,
        st.just("10.0.0.1"),
        st.just("ua1"),
        st.sampled_from(["", "n1", "n2"]),
        st.sampled_from([0, 1, 2]),
    ),
    # The same Connected for two principals or label sets: still one order.
    st.builds(
        Connected,
        st.just("10.0.0.1"),
        st.just("ua1"),
        st.just("n1"),
        st.just(1),
        st.sampled_from(["", "alice", "bob"]),
        st.sampled_from([(), (("tenant", "a"),), (("device", "ios"), ("tenant", "a"))]),
    ),
    st.builds(Activity, st.integers(0, 3)),
    st.builds(Disconnected, st.sampled_from([0, 1000, 1001, 65535]), st.sampled_from(["", "bye"])),
)
events = st.builds(
    Event, event_ids, connection_ids, st.sampled_from(["gw1", "gw2"]), times, payloads
)
event_lists = st.lists(events, max_size=30)


def merge_all(states: Iterable[dict[str, ConnectionState]]) -> dict[str, ConnectionState]:
    out: dict[str, ConnectionState] = {}
    for part in states:
        for cid, state in part.items():
            out[cid] = state if cid not in out else merge(out[cid], state)
    return out


@given(event_lists, st.randoms(use_true_random=False))
def test_any_permutation_gives_the_same_state(evs: list[Event], rnd: object) -> None:
    shuffled = list(evs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert fold(shuffled) == fold(evs)


@given(event_lists, st.lists(st.integers(0, 29), max_size=30))
def test_duplicates_change_nothing(evs: list[Event], picks: list[int]) -> None:
    duplicated = evs + [evs[i % len(evs)] for i in picks] if evs else evs
    assert fold(duplicated) == fold(evs)


@given(event_lists, st.lists(st.integers(0, 30), max_size=6))
def test_any_batch_split_merged_gives_the_same_state(evs: list[Event], cuts: list[int]) -> None:
    bounds = sorted({0, len(evs), *(min(c, len(evs)) for c in cuts)})
    batches = [evs[a:b] for a, b in itertools.pairwise(bounds)]
    assert merge_all(fold(b) for b in batches) == fold(evs)


def states_of(cid: str) -> st.SearchStrategy[ConnectionState]:
    """Reachable states of one connection: folds of its events."""
    return st.lists(events.map(lambda e: _with_cid(e, cid)), min_size=1, max_size=8).map(
        lambda evs: fold(evs)[cid]
    )


def _with_cid(e: Event, cid: str) -> Event:
    return Event(e.event_id, cid, e.gateway_id, e.occurred_at_ns, e.payload)


@given(states_of("c"), states_of("c"), states_of("c"))
def test_merge_is_associative(a: ConnectionState, b: ConnectionState, c: ConnectionState) -> None:
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


@given(states_of("c"), states_of("c"))
def test_merge_is_commutative(a: ConnectionState, b: ConnectionState) -> None:
    assert merge(a, b) == merge(b, a)


@given(states_of("c"))
def test_merge_is_idempotent(a: ConnectionState) -> None:
    assert merge(a, a) == a


def test_merge_refuses_different_connections() -> None:
    with pytest.raises(ValueError, match="different connections"):
        merge(ConnectionState("a"), ConnectionState("b"))


def ev(eid: str, at: int, payload: Payload, cid: str = "c", gw: str = "gw") -> Event:
    return Event(eid, cid, gw, at, payload)


def test_fields_come_from_their_events() -> None:
    state = fold(
        [
            ev("a1", T0 + 5, Activity(2)),
            ev("c1", T0 + 1, Connected("10.0.0.1", "curl/8"), gw="gw-7"),
            ev("d1", T0 + 9, Disconnected(1001, "going away")),
            ev("a2", T0 + 7, Activity(1)),
        ]
    )["c"]
    assert state == ConnectionState(
        "c",
        gateway_id="gw-7",
        source_ip="10.0.0.1",
        user_agent="curl/8",
        connected_at_ns=T0 + 1,
        connected_event_id="c1",
        last_active_at_ns=T0 + 9,
        disconnected_at_ns=T0 + 9,
        disconnect_status_code=1001,
        disconnect_reason="going away",
        disconnected_event_id="d1",
    )
    assert not state.is_open


def test_a_later_connected_does_not_move_connected_at() -> None:
    first = ev("c1", T0 + 1, Connected("10.0.0.1", "ua"), gw="gw-a")
    retry = ev("c2", T0 + 3, Connected("10.0.0.9", "ua2"), gw="gw-b")
    assert apply(of_event(retry), first) == apply(of_event(first), retry)
    state = apply(of_event(retry), first)
    assert (state.connected_at_ns, state.gateway_id, state.source_ip) == (
        T0 + 1,
        "gw-a",
        "10.0.0.1",
    )
    assert state.last_active_at_ns == T0 + 3
    assert state.is_open


def test_activity_alone_is_not_an_open_connection() -> None:
    state = of_event(ev("a", T0, Activity()))
    assert state.connected_at_ns is None
    assert not state.is_open


def test_the_earliest_disconnected_wins() -> None:
    late = ev("d2", T0 + 8, Disconnected(1000, "late"))
    early = ev("d1", T0 + 4, Disconnected(1006, "early"))
    state = fold([late, early])["c"]
    assert (state.disconnected_at_ns, state.disconnect_reason) == (T0 + 4, "early")
    assert state.last_active_at_ns == T0 + 8


def test_events_sharing_an_id_and_time_still_fold_deterministically() -> None:
    a = ev("same", T0, Connected("10.0.0.1", "ua"))
    b = ev("same", T0, Connected("10.0.0.2", "ua"))
    assert fold([a, b]) == fold([b, a])
    assert fold([a, b])["c"].source_ip == "10.0.0.1"


# The fast fold against the definition. fold() does not apply() event by event (see
# core/fold.py); these check it gives exactly what doing so gives, and that
# merge() and of_event() still equal their plain versions (written here with _replace, field
# by field, as they first were), on random batches full of ties, shared ids and duplicates.


def reference_of_event(event: Event) -> ConnectionState:
    p = event.payload
    base = ConnectionState(event.connection_id, last_active_at_ns=event.occurred_at_ns)
    if isinstance(p, Connected):
        return base._replace(
            gateway_id=event.gateway_id,
            source_ip=p.source_ip,
            user_agent=p.user_agent,
            connected_at_ns=event.occurred_at_ns,
            connected_event_id=event.event_id,
            node_id=p.node_id or None,
            node_incarnation=p.node_incarnation or None,
            principal=p.principal or None,
            labels=json.dumps(dict(p.labels), separators=(",", ":"), sort_keys=True)
            if p.labels
            else None,
        )
    if isinstance(p, Disconnected):
        return base._replace(
            disconnected_at_ns=event.occurred_at_ns,
            disconnect_status_code=p.status_code,
            disconnect_reason=p.reason,
            disconnected_event_id=event.event_id,
        )
    return base


def _connected_order(
    s: ConnectionState,
) -> tuple[int, str, str, str, str, str, int, str, str] | None:
    if s.connected_at_ns is None or s.connected_event_id is None:
        return None
    return (
        s.connected_at_ns,
        s.connected_event_id,
        s.gateway_id or "",
        s.source_ip or "",
        s.user_agent or "",
        s.node_id or "",
        s.node_incarnation or 0,
        s.principal or "",
        s.labels or "",
    )


def _disconnected_order(s: ConnectionState) -> tuple[int, str, str, str] | None:
    if s.disconnected_at_ns is None or s.disconnected_event_id is None:
        return None
    return (
        s.disconnected_at_ns,
        s.disconnected_event_id,
        f"{s.disconnect_status_code or 0:010d}",
        s.disconnect_reason or "",
    )


def reference_merge(a: ConnectionState, b: ConnectionState) -> ConnectionState:
    out = a
    ca, cb = _connected_order(a), _connected_order(b)
    if cb is not None and (ca is None or cb < ca):
        out = out._replace(
            gateway_id=b.gateway_id,
            source_ip=b.source_ip,
            user_agent=b.user_agent,
            connected_at_ns=b.connected_at_ns,
            connected_event_id=b.connected_event_id,
            node_id=b.node_id,
            node_incarnation=b.node_incarnation,
            principal=b.principal,
            labels=b.labels,
        )
    da, db = _disconnected_order(a), _disconnected_order(b)
    if db is not None and (da is None or db < da):
        out = out._replace(
            disconnected_at_ns=b.disconnected_at_ns,
            disconnect_status_code=b.disconnect_status_code,
            disconnect_reason=b.disconnect_reason,
            disconnected_event_id=b.disconnected_event_id,
        )
    times = [t for t in (a.last_active_at_ns, b.last_active_at_ns) if t is not None]
    return out._replace(last_active_at_ns=max(times) if times else None)


def reference_fold(evs: Iterable[Event]) -> dict[str, ConnectionState]:
    """The definition: each event's state merged into its connection's, one after another."""
    states: dict[str, ConnectionState] = {}
    for e in evs:
        new = reference_of_event(e)
        old = states.get(e.connection_id)
        states[e.connection_id] = new if old is None else reference_merge(old, new)
    return states


# Wider than `events` above: empty texts, close codes of every width, a few distinct contents
# behind the same (time, id), and times that collide often.
_texts = st.sampled_from(["", "a", "b", "10.0.0.1", "ua/1"])
wide_payloads: st.SearchStrategy[Payload] = st.one_of(
    st.builds(Connected, _texts, _texts),
    st.builds(Activity, st.integers(0, 2**64 - 1)),
    # Codes past ten digits sort as text (the key pads to ten): the fold must agree exactly.
    st.builds(Disconnected, st.sampled_from([0, 1000, 1001, 10**10 - 1, 10**10]), _texts),
    st.builds(Disconnected, st.integers(0, 2**40), _texts),
)
wide_events = st.builds(
    Event,
    st.sampled_from(["e1", "e2", "e3", "", "e10"]),
    st.sampled_from(["c1", "c2", "c3", "c4"]),
    _texts,
    st.integers(min_value=T0, max_value=T0 + 5) | st.integers(min_value=0, max_value=2**63),
    wide_payloads,
)
# Mostly ties: one connection, two times, two ids, so different contents meet on equal keys.
_tie_texts = st.sampled_from(["a", "b"])
tied_events = st.builds(
    Event,
    st.sampled_from(["e1", "e2"]),
    st.just("c1"),
    st.sampled_from(["g", ""]),
    st.sampled_from([T0, T0 + 1]),
    st.one_of(
        st.builds(Connected, _tie_texts, _tie_texts),
        st.builds(Connected, _tie_texts, _tie_texts, _tie_texts, st.sampled_from([0, 1, 2])),
        st.builds(
            Connected,
            _tie_texts,
            _tie_texts,
            _tie_texts,
            st.just(1),
            _tie_texts,
            st.sampled_from([(), (("k", "a"),), (("k", "b"),)]),
        ),
        st.builds(Activity, st.integers(0, 3)),
        st.builds(Disconnected, st.sampled_from([0, 1000, 10**10 - 1, 10**10]), _tie_texts),
    ),
)
wide_lists = st.lists(wide_events, max_size=60) | st.lists(tied_events, max_size=30)


@given(wide_lists, st.lists(st.integers(0, 59), max_size=20), st.randoms(use_true_random=False))
def test_fold_equals_applying_event_by_event(
    evs: list[Event], picks: list[int], rnd: object
) -> None:
    batch = evs + [evs[i % len(evs)] for i in picks] if evs else evs
    rnd.shuffle(batch)  # type: ignore[attr-defined]
    expected = reference_fold(batch)
    got = fold(batch)
    assert got == expected
    assert list(got) == list(expected)  # connections in order of first appearance
    by_apply: dict[str, ConnectionState] = {}
    for e in batch:
        by_apply[e.connection_id] = apply(by_apply.get(e.connection_id), e)
    assert by_apply == expected


@given(wide_lists)
def test_fold_tuples_equals_fold(evs: list[Event]) -> None:
    as_tuples = [
        (e.event_id, e.connection_id, e.gateway_id, e.occurred_at_ns, e.payload) for e in evs
    ]
    assert fold_tuples(as_tuples) == fold(evs)
    assert fold_tuples(iter(as_tuples)) == fold(evs)


@given(wide_events)
def test_of_event_equals_the_plain_version(e: Event) -> None:
    assert of_event(e) == reference_of_event(e)


def wide_states_of(cid: str) -> st.SearchStrategy[ConnectionState]:
    return st.lists(wide_events.map(lambda e: _with_cid(e, cid)), min_size=1, max_size=6).map(
        lambda evs: reference_fold(evs)[cid]
    )


@given(wide_states_of("c"), wide_states_of("c"))
def test_merge_equals_the_plain_version(a: ConnectionState, b: ConnectionState) -> None:
    assert merge(a, b) == reference_merge(a, b)
    assert merge(b, a) == reference_merge(b, a)


_optional_texts = st.none() | st.text(max_size=5)
_optional_ints = st.none() | st.integers()


def test_a_state_is_immutable() -> None:
    state = ConnectionState("c", gateway_id="g")
    with pytest.raises(AttributeError):
        state.gateway_id = "x"  # type: ignore[misc]


def test_fold_takes_any_iterable_once() -> None:
    evs = [ev("c1", T0 + 1, Connected("10.0.0.1", "ua")), ev("a1", T0 + 2, Activity(1))]
    assert fold(iter(evs)) == fold(evs) == reference_fold(evs)


node_events = st.builds(
    Event,
    event_ids,
    st.just(""),
    st.sampled_from(["gw1", "gw2"]),
    times,
    st.one_of(
        st.builds(NodeStarted, st.sampled_from(["n1", "n2"]), st.integers(1, 3)),
        st.builds(NodeHeartbeat, st.sampled_from(["n1", "n2"]), st.integers(1, 3)),
        st.builds(NodeFenced, st.sampled_from(["n1", "n2"]), st.integers(1, 3)),
    ),
)


def _node_tuples(evs: list[Event]) -> list[EventTuple]:
    return [(e.event_id, e.connection_id, e.gateway_id, e.occurred_at_ns, e.payload) for e in evs]


@given(st.lists(node_events, max_size=30), st.randoms(use_true_random=False), st.integers(0, 30))
def test_the_node_fold_ignores_order_duplicates_and_batch_splits(
    evs: list[Event], rnd: random.Random, cut: int
) -> None:
    once = fold_nodes(_node_tuples(evs))
    shuffled = list(evs) + evs[: cut // 2]
    rnd.shuffle(shuffled)
    assert fold_nodes(_node_tuples(shuffled)) == once
    first, second = fold_nodes(_node_tuples(evs[:cut])), fold_nodes(_node_tuples(evs[cut:]))
    joined = dict(first)
    for node_id, state in second.items():
        joined[node_id] = merge_nodes(joined[node_id], state) if node_id in joined else state
    assert joined == once
    # A node's own events never make connection states, and connection events no node states.
    assert fold(evs) == {}


def test_a_newer_incarnation_supersedes_everything_said_of_the_older() -> None:
    evs = [
        Event("h1", "", "gw", T0 + 9, NodeHeartbeat("n", 1)),
        Event("s2", "", "gw", T0 + 5, NodeStarted("n", 2)),
        Event("h2", "", "gw", T0 + 6, NodeHeartbeat("n", 2)),
    ]
    assert fold_nodes(_node_tuples(evs)) == {"n": NodeState("n", 2, T0 + 5, T0 + 6, "gw")}


def test_a_fence_holds_across_a_restart_and_is_no_sighting() -> None:
    evs = [
        Event("s1", "", "gw", T0 + 1, NodeStarted("n", 1)),
        Event("h1", "", "gw", T0 + 2, NodeHeartbeat("n", 1)),
        Event("f1", "", "gw", T0 + 30, NodeFenced("n", 1)),
        # The stalled node speaks again, then starts its next incarnation.
        Event("h1b", "", "gw", T0 + 40, NodeHeartbeat("n", 1)),
        Event("s2", "", "gw", T0 + 41, NodeStarted("n", 2)),
    ]
    node = fold_nodes(_node_tuples(evs))["n"]
    assert node == NodeState("n", 2, T0 + 41, T0 + 41, "gw", 1, T0 + 30)
    assert (node.fenced(1), node.fenced(None), node.fenced(2)) == (True, True, False)
    # Alone, the fence says nothing of when the node was seen.
    assert fold_nodes(_node_tuples(evs[2:3]))["n"].last_seen_ns == 0
    # Of two decisions on the same incarnation the earlier stands; a higher one wins.
    again = Event("f1b", "", "gw", T0 + 20, NodeFenced("n", 1))
    assert fold_nodes(_node_tuples([*evs, again]))["n"].fenced_at_ns == T0 + 20
    higher = Event("f2", "", "gw", T0 + 90, NodeFenced("n", 2))
    assert fold_nodes(_node_tuples([higher, *evs]))["n"][5:] == (2, T0 + 90)
