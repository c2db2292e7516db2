"""The history's node intervals answer exactly what the fold of the node events up to a moment
says (core/history.py), whatever order and batches the events come in."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from conntrack.core.events import EventTuple, NodeFenced, NodeHeartbeat, NodeStarted
from conntrack.core.fold import fold_nodes
from conntrack.core.history import (
    HOUR_NS,
    Sighting,
    bucket_of,
    buckets_of,
    coalesce,
    fences_of,
    nodes_at,
    sightings_of,
)
from conntrack.core.liveness import Liveness

T0 = 1_764_300_000_000_000_000
SPAN = 1_000

kinds = st.sampled_from([NodeStarted, NodeHeartbeat, NodeHeartbeat, NodeHeartbeat, NodeFenced])
node_events = st.lists(
    st.tuples(
        st.sampled_from(["n1", "n2"]),
        st.integers(1, 3),
        st.integers(T0, T0 + SPAN),
        kinds,
    ),
    max_size=40,
)


def as_tuples(raw: list[tuple[str, int, int, type]]) -> list[EventTuple]:
    return [
        (f"e{i}", "", "gw", at, kind(node, incarnation))
        for i, (node, incarnation, at, kind) in enumerate(raw)
    ]


def stored_intervals(events: list[EventTuple], splits: list[int], gap: int) -> list[Sighting]:
    """What the store holds after writing the events in these batches, each merged into the
    stored intervals as the store does it."""
    stored: list[Sighting] = []
    bounds = sorted({0, len(events), *(s % (len(events) + 1) for s in splits)})
    for lo, hi in itertools.pairwise(bounds):
        for new in sightings_of(events[lo:hi], gap):
            joined, hull = coalesce(stored, new, gap)
            stored = [s for s in stored if s not in joined] + [hull]
    return stored


@settings(max_examples=400)
@given(
    node_events,
    st.lists(st.integers(0, 40), max_size=5),
    st.integers(1, 200),
    st.integers(0, 300),
    st.lists(st.integers(T0 - 10, T0 + SPAN + 400), min_size=1, max_size=8),
    st.randoms(),
)
def test_nodes_at_is_the_fold_up_to_the_moment(
    raw: list[tuple[str, int, int, type]],
    splits: list[int],
    gap: int,
    extra_lease: int,
    moments: list[int],
    rnd: object,
) -> None:
    events = as_tuples(raw)
    shuffled = list(events)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    lease = gap + extra_lease  # answers are exact for any lease of at least the gap
    stored = stored_intervals(shuffled, splits, gap)
    fences = fences_of(shuffled)
    # The edges too: a sighting's own moment and the last moment its lease covers.
    edges = [e[3] + d for e in events[:6] for d in (0, lease, lease + 1)]
    for at in moments + edges:
        expected = Liveness(lease).bounds(fold_nodes(e for e in events if e[3] <= at), at).nodes
        assert nodes_at(stored, fences, at, lease) == dict(expected)


@given(node_events, st.lists(st.integers(0, 40), max_size=5), st.integers(1, 200), st.randoms())
def test_intervals_do_not_depend_on_order_batches_or_duplicates(
    raw: list[tuple[str, int, int, type]], splits: list[int], gap: int, rnd: object
) -> None:
    events = as_tuples(raw)
    again = events + events[: len(events) // 2]
    rnd.shuffle(again)  # type: ignore[attr-defined]
    assert sorted(stored_intervals(events, [], gap)) == sorted(stored_intervals(again, splits, gap))


def test_a_connection_has_a_row_for_every_hour_it_touches() -> None:
    start = 10 * HOUR_NS + 5
    assert list(buckets_of(start, start)) == [10]
    assert list(buckets_of(start, 11 * HOUR_NS)) == [10, 11]
    assert list(buckets_of(start, 13 * HOUR_NS - 1)) == [10, 11, 12]
    assert bucket_of(-1) == -1  # before the epoch still has an hour
