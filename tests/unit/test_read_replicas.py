"""Read replicas (api/read/replicas.py): the setting's parsing and validation, and the routing
rule that keeps the freshness header a true lower bound across replicas."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from conntrack.api.read.replicas import Routing, covers, describe_url
from conntrack.core.settings import Settings, split_urls

R1 = "postgresql+asyncpg://conntrack:secret@10.0.0.1:5432/conntrack"
R2 = "postgresql+asyncpg://conntrack:secret@10.0.0.2:6432/conntrack"


def test_split_urls_keeps_order_and_ignores_blanks() -> None:
    assert split_urls("") == ()
    assert split_urls(" , ") == ()
    assert split_urls(f" {R1} ,{R2},") == (R1, R2)


def test_replica_urls_default_to_none() -> None:
    assert Settings().api_read_database_urls == ""


def test_replica_urls_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNTRACK_API_READ_DATABASE_URLS", f"{R1}, {R2}")
    assert split_urls(Settings().api_read_database_urls) == (R1, R2)


@pytest.mark.parametrize(
    ("urls", "problem"),
    [
        ("sqlite+aiosqlite:///replica.db", "not sqlite+aiosqlite://..."),
        ("postgresql://u:pw@h/db", "not postgresql://..."),
        ("h:5432/db", "not a URL without a scheme"),
        (f"{R1},{R1}", "listed twice"),
    ],
)
def test_unusable_replica_urls_are_refused_without_the_password(urls: str, problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(api_read_database_urls=urls)
    message = caught.value.errors()[0]["msg"]
    assert problem in message
    assert "secret" not in message
    assert "pw@" not in message


def test_replica_urls_are_an_api_setting() -> None:
    from conntrack.core.settings import SECTIONS

    assert "api_read_database_urls" in SECTIONS["api"]


def test_describe_url_never_shows_credentials() -> None:
    assert describe_url(R2) == "10.0.0.2:6432/conntrack"
    assert describe_url("postgresql+asyncpg://u@db/conntrack") == "db:5432/conntrack"


def test_covers() -> None:
    assert covers({}, {})
    assert covers({("t", 0): 5}, {("t", 0): 5})
    assert covers({("t", 0): 6, ("t", 1): 1}, {("t", 0): 5})
    assert not covers({("t", 0): 4}, {("t", 0): 5})
    # A partition the replica has applied nothing of is behind any header that names it.
    assert not covers({("t", 0): 9}, {("t", 1): 1})


def test_first_healthy_replica_with_failover_and_return() -> None:
    routing = Routing(3, horizon_seconds=5)
    assert routing.eligible(0) == (0, 1, 2)
    assert routing.mark_down(0)
    assert not routing.mark_down(0)  # already down: reported once
    assert routing.eligible(0) == (1, 2)
    assert routing.candidates() == (1, 2, 0)
    assert routing.mark_up(0)
    assert routing.eligible(0) == (0, 1, 2)


def test_a_replica_behind_a_handed_out_position_is_skipped_until_it_catches_up() -> None:
    routing = Routing(2, horizon_seconds=5)
    routing.observed(0, {("t", 0): 10})
    routing.observed(1, {("t", 0): 7})
    routing.handed_out({("t", 0): 10}, now=100)
    assert routing.eligible(100) == (0,)
    routing.mark_down(0)
    assert routing.eligible(101) == ()  # rows from 1 might not reflect the header's 10
    routing.observed(1, {("t", 0): 10})
    assert routing.eligible(101) == (1,)


def test_the_floor_expires_after_the_horizon() -> None:
    routing = Routing(2, horizon_seconds=5)
    routing.observed(0, {("t", 0): 10})
    routing.handed_out({("t", 0): 10}, now=100)
    routing.mark_down(0)
    assert routing.eligible(105) == ()
    # No header with 10 can still be in use: the replica that is behind serves again.
    assert routing.eligible(105.1) == (1,)
    assert routing.floor() == {}


def test_a_position_never_goes_back() -> None:
    routing = Routing(1, horizon_seconds=5)
    routing.observed(0, {("t", 0): 10})
    routing.observed(0, {("t", 0): 3})  # a stale answer that arrived late
    routing.handed_out({("t", 0): 10}, now=0)
    assert routing.eligible(0) == (0,)


def test_routing_needs_a_replica() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Routing(0, horizon_seconds=1)


_offsets = st.dictionaries(st.sampled_from([("t", 0), ("t", 1), ("u", 0)]), st.integers(0, 20))
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("down"), st.integers(0, 2)),
        st.tuples(st.just("up"), st.integers(0, 2)),
        st.tuples(st.just("observed"), st.integers(0, 2), _offsets),
        st.tuples(st.just("handed_out"), _offsets),
        st.tuples(st.just("wait"), st.floats(0, 4)),
    ),
    max_size=40,
)


@given(_steps)
def test_rows_only_come_from_a_replica_that_reflects_every_live_header(steps: list[tuple]) -> None:  # type: ignore[type-arg]
    """Whatever happens, an eligible replica is up and has been seen at or past every position
    handed out within the horizon (the lower bound a header promises)."""
    horizon = 5.0
    routing = Routing(3, horizon_seconds=horizon)
    now = 0.0
    up = [True] * 3
    seen: list[list[dict[tuple[str, int], int]]] = [[], [], []]
    handed: list[tuple[float, dict[tuple[str, int], int]]] = []
    for step in steps:
        if step[0] == "down":
            routing.mark_down(step[1])
            up[step[1]] = False
        elif step[0] == "up":
            routing.mark_up(step[1])
            up[step[1]] = True
        elif step[0] == "observed":
            routing.observed(step[1], step[2])
            seen[step[1]].append(step[2])
        elif step[0] == "handed_out":
            routing.handed_out(step[1], now)
            handed.append((now, step[1]))
        else:
            now += step[1]
        for replica in routing.eligible(now):
            assert up[replica]
            best: dict[tuple[str, int], int] = {}
            for reading in seen[replica]:
                for key, offset in reading.items():
                    best[key] = max(best.get(key, 0), offset)
            for at, positions in handed:
                if now - at <= horizon:
                    assert covers(best, positions)
