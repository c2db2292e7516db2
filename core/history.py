"""Presence in time, the pure part: what the read model keeps so that "who was connected at T"
is answered exactly from rows, without replaying the log (docs/history.md).

An answer at T must equal the fold of the events that occurred at or before T, judged by the
liveness rules at T (core/liveness.py). For a connection that takes its interval: connected at
or before T and not disconnected at or before T (the fold's winning Connected is its earliest, so
a connection's stored connected_at tells whether it had connected by T, and likewise its
disconnect). For a node it takes more than its current row: its newest incarnation by T, and
whether it was heard from within the lease before T. So the read model keeps each node's
sightings as intervals of one incarnation within which no two consecutive sightings are more
than `gap` apart (the components of its sighting times: the same whatever order and however
often the events arrive), and each fence with the earliest time it was decided. From those,
nodes_at() gives exactly the bounds Liveness.bounds() gives for the fold at T, for any lease of
at least `gap` (tests/unit/test_history.py checks it against the fold).

A closed connection's row moves, once retention takes it out of the connections table, into the
history table, one row per hour its interval touches (its buckets): the rows of one bucket are
what an answer at a moment of that hour reads, so the work of an answer depends on the traffic
of that hour, not on the days kept. Activity is not kept moment by moment, so the idle rule is
not judged at past times (only the node rules and the maximum lifetime are).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from conntrack.core.events import EventTuple, NodeFenced, NodeHeartbeat, NodeStarted
from conntrack.core.fold import ConnectionState, fold_nodes, fold_tuples
from conntrack.core.liveness import LiveBounds, Liveness

HOUR_NS = 3_600_000_000_000
DAY_NS = 24 * HOUR_NS
BUCKETS_PER_DAY = DAY_NS // HOUR_NS
# Sightings of a node's incarnation closer together than this are one interval. Answers in
# time are exact for any lease at least this long (the lease must be well above the heartbeat
# interval anyway: 30 s and 5 s by default); with heartbeats further apart than this a node
# leaves an interval per heartbeat, which stays exact but takes more rows.
SIGHTING_GAP_NS = 10_000_000_000


def oldest_answered(
    since_ns: int | None, now_ns: int, history_days: int, lease_ns: int
) -> int | None:
    """The oldest moment answers in time reach: within history_days, and a lease after the
    read model began keeping node sightings (before, a node's last sighting may be missing).
    None: no history (none kept, or not begun)."""
    if since_ns is None or history_days <= 0:
        return None
    return max(since_ns + lease_ns, now_ns - history_days * DAY_NS)


def bucket_of(at_ns: int) -> int:
    """The hour an instant falls in, counted from the epoch."""
    return at_ns // HOUR_NS


def buckets_of(connected_at_ns: int, disconnected_at_ns: int) -> range:
    """The hours a closed connection's interval [connected, disconnected) touches, each
    holding a row of it in the history (at least one: a connection that closed as it opened
    still has its row)."""
    first = bucket_of(connected_at_ns)
    return range(first, max(first, bucket_of(disconnected_at_ns)) + 1)


class Sighting(NamedTuple):
    """An interval of a node's sightings of one incarnation."""

    node_id: str
    incarnation: int
    first_seen_ns: int
    last_seen_ns: int


def sightings_of(events: Iterable[EventTuple], gap_ns: int) -> list[Sighting]:
    """The intervals of the nodes' starts and heartbeats among these events (a fence is a
    decision about a node, not a sighting of it: fences_of)."""
    times: dict[tuple[str, int], list[int]] = {}
    for _, _, _, at, payload in events:
        if isinstance(payload, NodeStarted | NodeHeartbeat):
            times.setdefault((payload.node_id, payload.incarnation), []).append(at)
    out: list[Sighting] = []
    for (node_id, incarnation), seen in sorted(times.items()):
        seen.sort()
        first = last = seen[0]
        for at in seen[1:]:
            if at - last > gap_ns:
                out.append(Sighting(node_id, incarnation, first, last))
                first = at
            last = at
        out.append(Sighting(node_id, incarnation, first, last))
    return out


def coalesce(
    stored: Iterable[Sighting], new: Sighting, gap_ns: int
) -> tuple[list[Sighting], Sighting]:
    """Merging an interval into a node's stored ones: the stored intervals it joins (within
    gap_ns of it, same node and incarnation), which are replaced by the returned hull."""
    joined = [
        s
        for s in stored
        if (s.node_id, s.incarnation) == (new.node_id, new.incarnation)
        and s.first_seen_ns <= new.last_seen_ns + gap_ns
        and s.last_seen_ns >= new.first_seen_ns - gap_ns
    ]
    first = min([new.first_seen_ns, *(s.first_seen_ns for s in joined)])
    last = max([new.last_seen_ns, *(s.last_seen_ns for s in joined)])
    return joined, Sighting(new.node_id, new.incarnation, first, last)


def fences_of(events: Iterable[EventTuple]) -> dict[tuple[str, int], int]:
    """(node, incarnation) -> the earliest time a fence of it was decided, among these events."""
    out: dict[tuple[str, int], int] = {}
    for _, _, _, at, payload in events:
        if isinstance(payload, NodeFenced):
            key = (payload.node_id, payload.incarnation)
            out[key] = min(at, out.get(key, at))
    return out


def nodes_at(
    sightings: Iterable[Sighting],
    fences: Mapping[tuple[str, int], int],
    at_ns: int,
    lease_ns: int,
) -> dict[str, tuple[int, bool, int]]:
    """The nodes at `at_ns` as LiveBounds.nodes holds them: node -> (its newest incarnation,
    lost (not heard from within the lease), fenced through). Exact for intervals merged across
    a gap of at most lease_ns."""
    newest: dict[str, int] = {}
    fenced: dict[str, int] = {}
    known = [s for s in sightings if s.first_seen_ns <= at_ns]
    for s in known:
        newest[s.node_id] = max(newest.get(s.node_id, 0), s.incarnation)
    for (node_id, incarnation), fenced_at in fences.items():
        if fenced_at <= at_ns:
            newest[node_id] = max(newest.get(node_id, 0), incarnation)
            fenced[node_id] = max(fenced.get(node_id, 0), incarnation)
    heard = {
        s.node_id
        for s in known
        if s.incarnation == newest[s.node_id] and at_ns <= s.last_seen_ns + lease_ns
    }
    return {
        node_id: (
            incarnation,
            bool(lease_ns) and node_id not in heard,
            fenced.get(node_id, 0),
        )
        for node_id, incarnation in newest.items()
    }


def replay_at(
    events: Iterable[EventTuple], at_ns: int, liveness: Liveness
) -> tuple[dict[str, ConnectionState], LiveBounds]:
    """The oracle of every answer in time: the fold of the events that occurred by at_ns, and
    the liveness rules at at_ns judged on the nodes' fold (the idle rule left out, as answers
    in time leave it: activity is not kept moment by moment)."""
    until = [e for e in events if e[3] <= at_ns]
    bounds = Liveness(liveness.node_lease_ns, 0, liveness.max_lifetime_ns).bounds(
        fold_nodes(until), at_ns
    )
    return fold_tuples(until), bounds


def open_at(
    states: Mapping[str, ConnectionState], bounds: LiveBounds
) -> dict[str, ConnectionState]:
    """Of replay_at()'s states, the connections open and live then."""
    return {
        cid: s
        for cid, s in states.items()
        if s.is_open
        and s.connected_at_ns is not None
        and bounds.gone(
            node_id=s.node_id,
            node_incarnation=s.node_incarnation,
            connected_at_ns=s.connected_at_ns,
            last_active_at_ns=s.last_active_at_ns or s.connected_at_ns,
        )
        is None
    }
