"""lifecycle/telling.py: each connection told opened once and closed once, whatever the order
the partitions are read in, duplicates, fences, restarts and a restore from the changelog."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from conntrack.core.events import (
    Activity,
    Cause,
    Connected,
    Disconnected,
    EventTuple,
    NodeFenced,
    NodeHeartbeat,
    NodeStarted,
    Payload,
)
from conntrack.lifecycle.telling import Reason, Teller, Told

S = 1_000_000_000
T0 = 1_764_300_000 * S
LEASE = 30 * S


def teller() -> Teller:
    return Teller(lease_ns=LEASE, remember_closed_ns=3600 * S)


def ev(cid: str, at: int, payload: Payload, eid: str = "") -> EventTuple:
    return (eid or f"{cid}@{at}", cid, "gw", at, payload)


def node_ev(at: int, payload: NodeStarted | NodeHeartbeat | NodeFenced) -> EventTuple:
    return (f"{payload.node_id}@{at}", "", "gw", at, payload)


def feed(
    t: Teller,
    events: list[tuple[int, EventTuple]],
    changelog: list[tuple[str, str | None]] | None = None,
) -> list[Told]:
    """What the teller tells of these events, taken after each event as the runner takes a
    transaction's; the changes are appended to changelog (the state topic, uncompacted)."""
    told: list[Told] = []
    for partition, event in events:
        t.on_event(partition, event)
        now_told, changes = t.take()
        told += now_told
        if changelog is not None:
            changelog += changes.items()
    return told


def kinds(told: list[Told]) -> list[tuple[str, str, int]]:
    return [(t.kind, t.connection_id, t.reason) for t in told]


def test_a_connection_is_told_opened_then_closed_with_its_cause() -> None:
    t = teller()
    told = feed(
        t,
        [
            (0, node_ev(T0, NodeStarted("n", 1))),
            (1, ev("c", T0 + 1, Connected("ip", "ua", "n", 1, "alice", (("tier", "gold"),)))),
            (1, ev("c", T0 + 2, Activity(1))),
            (1, ev("c", T0 + 3, Disconnected(1000, "bye", Cause.CLIENT_CLOSED))),
            # A duplicate of each changes nothing.
            (1, ev("c", T0 + 1, Connected("ip", "ua", "n", 1, "alice", (("tier", "gold"),)))),
            (1, ev("c", T0 + 3, Disconnected(1000, "bye", Cause.CLIENT_CLOSED))),
        ],
    )
    assert kinds(told) == [("opened", "c", 0), ("closed", "c", Reason.CLIENT_CLOSED)]
    assert (told[0].principal, told[0].labels, told[0].at_ns) == (
        "alice",
        (("tier", "gold"),),
        T0 + 1,
    )
    assert (told[1].status_code, told[1].reason_text, told[1].at_ns) == (1000, "bye", T0 + 3)


def test_a_disconnected_read_before_its_connected_closes_it_when_it_comes() -> None:
    t = teller()
    told = feed(
        t,
        [
            (1, ev("c", T0 + 3, Disconnected(1000, "", Cause.DISCONNECTED_BY_API))),
            (1, ev("c", T0 + 1, Connected("ip", "ua"))),
        ],
    )
    assert kinds(told) == [("opened", "c", 0), ("closed", "c", Reason.DISCONNECTED_BY_API)]


def test_a_lost_node_is_fenced_once_its_partition_is_read_and_stays_fenced() -> None:
    t = teller()
    feed(
        t,
        [
            (0, node_ev(T0, NodeStarted("n", 1))),
            (1, ev("a", T0 + 1, Connected("ip", "ua", "n", 1))),
            (2, ev("b", T0 + 2, Connected("ip", "ua", "n", 1))),
        ],
    )
    later = T0 + LEASE + S
    assert t.due_fences(T0 + LEASE - 1, True) == []
    assert t.due_fences(later, False) == []  # the log is not read to its end yet
    (fence,) = t.due_fences(later, True)
    assert (fence.node_id, fence.incarnation, fence.at_ns) == ("n", 1, later)
    told = t.take()[0]
    assert sorted(kinds(told)) == [
        ("closed", "a", Reason.NODE_LOST),
        ("closed", "b", Reason.NODE_LOST),
    ]
    assert {x.at_ns for x in told} == {later}
    # Nothing is left to fence; the node, heard from again, reopens nothing.
    assert t.due_fences(later + LEASE * 2, True) == []
    told = feed(
        t,
        [
            (0, node_ev(later + 5, NodeHeartbeat("n", 1))),
            (3, ev("late", later + 6, Connected("ip", "ua", "n", 1))),
            (1, ev("a", later + 7, Disconnected(1012, "fenced", Cause.NODE_FENCED))),
            # Its own NodeFenced, read back from the log, is no news.
            (0, node_ev(later, NodeFenced("n", 1))),
        ],
    )
    assert kinds(told) == [("opened", "late", 0), ("closed", "late", Reason.NODE_LOST)]
    assert told[1].at_ns == later + 6


def test_a_new_incarnation_closes_the_older_ones_connections() -> None:
    t = teller()
    told = feed(
        t,
        [
            (1, ev("a", T0 + 1, Connected("ip", "ua", "n", 1))),
            (0, node_ev(T0, NodeStarted("n", 1))),
            (0, node_ev(T0 + 10, NodeStarted("n", 2))),
            (2, ev("b", T0 + 2, Connected("ip", "ua", "n", 1))),
            (3, ev("c", T0 + 11, Connected("ip", "ua", "n", 2))),
        ],
    )
    assert kinds(told) == [
        ("opened", "a", 0),
        ("closed", "a", Reason.NODE_RESTARTED),
        ("opened", "b", 0),
        ("closed", "b", Reason.NODE_RESTARTED),
        ("opened", "c", 0),
    ]


# -- any order, any restart ------------------------------------------------------------------

CONNECTIONS = [f"c{i}" for i in range(8)]


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[int, EventTuple]]:
    """Connections on nodes n1/n2 (incarnations 1-2), each on its own partition, with node
    events on partition 0 and fences among them."""
    events: list[tuple[int, EventTuple]] = []
    for i, cid in enumerate(CONNECTIONS):
        at = T0 + draw(st.integers(0, 20)) * S
        node = draw(st.sampled_from(["n1", "n2"]))
        incarnation = draw(st.integers(1, 2))
        part = 1 + i % 3
        events.append((part, ev(cid, at, Connected("ip", "ua", node, incarnation))))
        if draw(st.booleans()):
            events.append((part, ev(cid, at + S, Activity(1))))
        if draw(st.booleans()):
            cause = draw(st.sampled_from(list(Cause)))
            events.append((part, ev(cid, at + 2 * S, Disconnected(1000, "", cause))))
    for node in ("n1", "n2"):
        for incarnation in (1, 2):
            at = T0 + draw(st.integers(0, 20)) * S
            kinds: list[type[NodeStarted | NodeHeartbeat | NodeFenced]] = [
                NodeStarted,
                NodeHeartbeat,
                NodeFenced,
            ]
            kind = draw(st.sampled_from(kinds))
            events.append((0, node_ev(at, kind(node, incarnation))))
    return events


def interleave(
    events: list[tuple[int, EventTuple]], rnd: random.Random
) -> list[tuple[int, EventTuple]]:
    """Any order across partitions, each partition's own order kept."""
    queues: dict[int, list[tuple[int, EventTuple]]] = {}
    for e in events:
        queues.setdefault(e[0], []).append(e)
    out = []
    while queues:
        p = rnd.choice(sorted(queues))
        out.append(queues[p].pop(0))
        if not queues[p]:
            del queues[p]
    return out


def check_told_once(told: list[Told], events: list[tuple[int, EventTuple]]) -> None:
    seen: dict[str, list[str]] = {}
    for t in told:
        seen.setdefault(t.connection_id, []).append(t.kind)
    for cid, ks in seen.items():
        assert ks in (["opened"], ["opened", "closed"]), (cid, ks)
    connected = {e[1] for _, e in events if isinstance(e[4], Connected)}
    assert set(seen) == connected
    disconnected = {e[1] for _, e in events if isinstance(e[4], Disconnected)}
    assert disconnected <= {c for c, ks in seen.items() if "closed" in ks}


def restore_from(changelog: list[tuple[str, str | None]]) -> Teller:
    """A teller restored from these state records, in order, as the runner reads them."""
    t = teller()
    for key, value in changelog:
        if value is None:
            t.forget_restored(key)
        else:
            t.restore(key, value)
    return t


@settings(max_examples=200)
@given(histories(), st.randoms(use_true_random=False), st.integers(0, 40), st.booleans())
def test_each_connection_is_told_once_in_any_order_and_across_a_restore(
    events: list[tuple[int, EventTuple]], rnd: random.Random, cut: int, fence: bool
) -> None:
    order = interleave(events, rnd)
    whole = teller()
    told = feed(whole, order)
    if fence:
        whole.due_fences(T0 + 10**6 * S, True)
        told += whole.take()[0]
    check_told_once(told, events)

    # Stopped after `cut` events, restored from its changelog, and run on: the same told.
    first = teller()
    changelog: list[tuple[str, str | None]] = []
    told_before = feed(first, order[:cut], changelog)
    # Restored from the state topic as it was written, or as compaction leaves it: the same.
    restored = restore_from(changelog)
    compacted = list(dict(changelog).items())
    assert sorted(restored.open_connections()) == sorted(restore_from(compacted).open_connections())
    late = T0 + 10**6 * S
    assert restore_from(changelog).due_fences(late, True) == restore_from(compacted).due_fences(
        late, True
    )
    told_after = feed(restored, order[cut:])
    if fence:
        restored.due_fences(T0 + 10**6 * S, True)
        told_after += restored.take()[0]
    assert told_before + told_after == told


def test_closed_connections_are_forgotten_after_the_window_and_in_the_changelog() -> None:
    t = Teller(lease_ns=LEASE, remember_closed_ns=60 * S)
    for partition, event in [
        (1, ev("c", T0, Connected("ip", "ua"))),
        (1, ev("c", T0 + S, Disconnected(1000, ""))),
        (2, ev("stray", T0 + S, Disconnected(1000, ""))),
        (3, ev("d", T0 + 120 * S, Connected("ip", "ua"))),
    ]:
        t.on_event(partition, event)
    t.forget_closed()
    changes = t.take()[1]
    assert changes["c/c"] is None
    assert changes["c/stray"] is None
    assert "c/d" in changes
