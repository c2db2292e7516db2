"""The fold is a join-semilattice: order, duplicates and batch splits do not change the state."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connection_tracker.events import Activity, Connected, Disconnected, Event, Payload
from projector.fold import ConnectionState, apply, fold, merge, of_event

T0 = 1_764_300_000_000_000_000

connection_ids = st.sampled_from(["c1", "c2", "c3"])
times = st.integers(min_value=T0, max_value=T0 + 50)  # narrow: many ties
event_ids = st.sampled_from([f"e{i}" for i in range(12)])  # few: colliding ids happen
payloads: st.SearchStrategy[Payload] = st.one_of(
    st.builds(Connected, st.sampled_from(["10.0.0.1", "::1"]), st.sampled_from(["ua1", "ua2"])),
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
