"""The traffic simulator: reproducible, plausible, and within the workload's limits."""

from __future__ import annotations

import ipaddress
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conntrack.core.events import Activity, Connected, Disconnected, Event, decode, encode
from conntrack.producer.simulator import Workload, generate

START = 1_764_300_000_000_000_000


def by_connection(events: list[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        out[e.connection_id].append(e)
    return out


def test_the_same_seed_gives_the_same_events_and_another_seed_others() -> None:
    w = Workload(connections=50, seed=42)
    first = list(generate(w, START))
    assert first == list(generate(w, START))
    other = list(generate(Workload(connections=50, seed=43), START))
    assert {e.event_id for e in first}.isdisjoint(e.event_id for e in other)
    assert {e.connection_id for e in first}.isdisjoint(e.connection_id for e in other)


def test_connections_follow_the_workload() -> None:
    w = Workload(gateways=4, connections=200, activities_per_connection=3, seed=5)
    events = list(generate(w, START))
    per_connection = by_connection(events)
    assert len(per_connection) == 200
    assert len({e.gateway_id for e in events}) <= 4
    for history in per_connection.values():
        assert isinstance(history[0].payload, Connected)
        assert [type(e.payload) for e in history[1:4]] == [Activity] * 3
        assert len(history) in (4, 5)
        if len(history) == 5:
            assert isinstance(history[4].payload, Disconnected)
        assert len({e.gateway_id for e in history}) == 1
    disconnected = sum(1 for h in per_connection.values() if len(h) == 5)
    assert 0 < disconnected < 200


@pytest.mark.parametrize(("ratio", "expected"), [(0.0, 0), (1.0, 60)])
def test_disconnect_ratio_bounds(ratio: float, expected: int) -> None:
    events = list(generate(Workload(connections=60, disconnect_ratio=ratio), START))
    assert Counter(e.kind for e in events)["disconnected"] == expected


def test_events_are_in_time_order_with_unique_ids_and_valid_for_the_projector() -> None:
    events = list(generate(Workload(connections=300, seed=9), START, order="time"))
    times = [e.occurred_at_ns for e in events]
    assert times == sorted(times)
    assert times[0] == START
    assert len({e.event_id for e in events}) == len(events)
    for e in events:
        assert decode(encode(e), e.connection_id.encode()) == e


def test_addresses_are_global_ipv4_and_ipv6_and_agents_vary() -> None:
    events = list(generate(Workload(connections=400, ipv6_share=0.3, seed=3), START))
    identities = [e.payload for e in events if isinstance(e.payload, Connected)]
    addresses = [ipaddress.ip_address(i.source_ip) for i in identities]
    assert all(a.is_global for a in addresses)
    versions = Counter(a.version for a in addresses)
    assert versions[4] > 0
    assert versions[6] > 0
    assert len({i.user_agent for i in identities}) > 3
    v4_only = list(generate(Workload(connections=50, ipv6_share=0.0), START))
    assert all(
        ipaddress.ip_address(e.payload.source_ip).version == 4
        for e in v4_only
        if isinstance(e.payload, Connected)
    )


def test_concurrent_connections_never_exceed_the_limit() -> None:
    w = Workload(connections=500, concurrent=20, disconnect_ratio=1.0, seed=11)
    events = list(generate(w, START, order="time"))
    open_now = peak = 0
    for e in events:
        open_now += {"connected": 1, "disconnected": -1}.get(e.kind, 0)
        peak = max(peak, open_now)
    assert peak == 20
    assert Counter(e.kind for e in events)["connected"] == 500  # waiting arrivals got in


def test_duration_and_event_count_stop_generation() -> None:
    second = 1_000_000_000
    w = Workload(connections=10**9, disconnect_ratio=1.0, duration_s=5.0, seed=2)
    events = list(generate(w, START))
    assert events
    assert all(START <= e.occurred_at_ns < START + 5 * second for e in events)
    for order in ("time", "connection"):
        many = Workload(connections=10**9, max_events=1234)
        assert len(list(generate(many, START, order=order))) == 1234


def test_grouped_order_has_the_same_events_each_connection_together() -> None:
    w = Workload(connections=300, concurrent=40, disconnect_ratio=0.7, seed=8)
    in_time = list(generate(w, START, order="time"))
    grouped = list(generate(w, START))
    assert sorted(e.event_id for e in grouped) == sorted(e.event_id for e in in_time)
    assert by_connection(grouped) == by_connection(in_time)  # each connection's order kept
    runs = [
        e.connection_id
        for i, e in enumerate(grouped)
        if i == 0 or grouped[i - 1].connection_id != e.connection_id
    ]
    assert len(runs) == len(set(runs)) == len(by_connection(in_time))  # one run each
    # Live traffic interleaves: in time order the connections' events are mixed.
    assert len(in_time) > sum(
        1
        for i, e in enumerate(in_time)
        if i == 0 or in_time[i - 1].connection_id == e.connection_id
    )
    with pytest.raises(ValueError, match="order"):
        list(generate(w, START, order="random"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        {"gateways": 0},
        {"connections": -1},
        {"concurrent": 0},
        {"connect_rate": 0.0},
        {"activity_rate": -1.0},
        {"disconnect_ratio": 1.5},
        {"ipv6_share": -0.1},
        {"duration_s": 0.0},
        {"max_events": -1},
    ],
)
def test_impossible_workloads_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Workload(**bad)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    connections=st.integers(0, 60),
    activities=st.integers(0, 6),
    ratio=st.floats(0, 1),
    concurrent=st.one_of(st.none(), st.integers(1, 10)),
    seed=st.integers(0, 2**32),
)
def test_every_connection_history_is_well_formed(
    connections: int, activities: int, ratio: float, concurrent: int | None, seed: int
) -> None:
    w = Workload(
        connections=connections,
        activities_per_connection=activities,
        disconnect_ratio=ratio,
        concurrent=concurrent,
        seed=seed,
    )
    events = list(generate(w, START))
    for history in by_connection(events).values():
        kinds = [e.kind for e in history]
        assert kinds[0] == "connected"
        assert kinds[1 : 1 + activities] == ["activity"] * activities
        assert kinds[1 + activities :] in ([], ["disconnected"])
    assert len(by_connection(events)) <= connections
    if concurrent is None:
        assert len(by_connection(events)) == connections
