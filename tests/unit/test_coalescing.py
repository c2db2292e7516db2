"""The activity coalescer, driven by an explicit clock: exact behaviour plus properties."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conntrack.producer.coalescing import ActivityCoalescer, CoalescedActivity

SECOND = 1_000_000_000
T0 = 1_764_300_000 * SECOND  # gateway (wall) clock of the first activity


def test_first_activity_goes_out_at_once_the_rest_of_the_interval_is_merged() -> None:
    c = ActivityCoalescer(SECOND)
    assert c.record("a", T0, 1, now_ns=0) == CoalescedActivity("a", T0, 1)
    for i in range(1, 1000):
        assert c.record("a", T0 + i, 2, now_ns=i * 1000) is None
    assert c.pending == 1
    assert c.due(SECOND - 1) == []
    assert c.due(SECOND) == [CoalescedActivity("a", T0 + 999, 2 * 999)]
    assert c.pending == 0


def test_the_latest_time_is_kept_even_when_calls_arrive_out_of_order() -> None:
    c = ActivityCoalescer(SECOND)
    c.record("a", T0, 1, now_ns=0)
    c.record("a", T0 + 50, 1, now_ns=1)
    c.record("a", T0 + 10, 1, now_ns=2)
    assert c.drain() == [CoalescedActivity("a", T0 + 50, 2)]


def test_a_steady_stream_costs_one_event_per_interval() -> None:
    c = ActivityCoalescer(SECOND)
    emitted = []
    for ms in range(10_000):  # one call per millisecond for ten seconds
        now = ms * 1_000_000
        out = c.record("a", T0 + now, 1, now_ns=now)
        emitted += [out] if out else []
        emitted += c.due(now)
    emitted += c.drain()
    assert len(emitted) == 11  # t=0, then one at the end of each of the ten intervals
    assert sum(a.frames for a in emitted) == 10_000
    assert emitted[-1].latest_at_ns == T0 + 9_999_000_000


def test_take_returns_the_pending_activity_and_forgets_the_connection() -> None:
    c = ActivityCoalescer(SECOND)
    c.record("a", T0, 1, now_ns=0)
    c.record("a", T0 + 7, 3, now_ns=5)
    c.record("b", T0 + 8, 1, now_ns=6)
    assert c.take("a") == CoalescedActivity("a", T0 + 7, 3)
    assert c.take("a") is None
    assert c.take("b") is None  # b's only activity already went out
    # A forgotten connection starts afresh: its next activity goes out at once.
    assert c.record("a", T0 + 9, 1, now_ns=7) == CoalescedActivity("a", T0 + 9, 1)


def test_drain_returns_every_pending_activity() -> None:
    c = ActivityCoalescer(SECOND)
    for cid in "abc":
        c.record(cid, T0, 1, now_ns=0)
        c.record(cid, T0 + 1, 1, now_ns=1)
    c.record("d", T0, 1, now_ns=1)
    assert sorted(a.connection_id for a in c.drain()) == ["a", "b", "c"]
    assert len(c) == 0
    assert c.drain() == []


def test_activity_after_the_interval_carries_what_was_pending() -> None:
    c = ActivityCoalescer(SECOND)
    c.record("a", T0, 1, now_ns=0)
    c.record("a", T0 + 1, 4, now_ns=10)
    # due() was not called in time; the next call still must not lose the pending frames.
    assert c.record("a", T0 + 2, 1, now_ns=2 * SECOND) == CoalescedActivity("a", T0 + 2, 5)


def test_quiet_connections_are_forgotten_after_one_interval() -> None:
    c = ActivityCoalescer(SECOND)
    for i in range(100):
        c.record(f"c{i}", T0, 1, now_ns=i)
    assert len(c) == 100
    assert c.next_deadline_ns() == SECOND
    assert c.due(SECOND + 99) == []
    assert len(c) == 0
    assert c.next_deadline_ns() is None


def test_zero_interval_publishes_every_call_and_tracks_nothing() -> None:
    c = ActivityCoalescer(0)
    assert [c.record("a", T0 + i, 1, now_ns=0) for i in range(3)] == [
        CoalescedActivity("a", T0 + i, 1) for i in range(3)
    ]
    assert len(c) == 0


def test_a_clock_stepping_back_does_not_reorder_or_lose_anything() -> None:
    c = ActivityCoalescer(SECOND)
    c.record("a", T0, 1, now_ns=5 * SECOND)
    c.record("b", T0, 1, now_ns=1)  # stands still at 5 s
    c.record("b", T0 + 1, 1, now_ns=1)
    assert c.due(6 * SECOND) == [CoalescedActivity("b", T0 + 1, 1)]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        ActivityCoalescer(-1)
    with pytest.raises(ValueError, match="frames"):
        ActivityCoalescer(SECOND).record("a", T0, -1, now_ns=0)


@dataclass(frozen=True)
class Record:
    connection: int
    frames: int
    at_offset: int


@dataclass(frozen=True)
class Advance:
    ns: int


@dataclass(frozen=True)
class Take:
    connection: int


operations = st.lists(
    st.one_of(
        st.builds(
            Record,
            st.integers(0, 4),
            st.integers(0, 1000),
            st.integers(-SECOND, 100 * SECOND),
        ),
        st.builds(Advance, st.integers(0, 3 * SECOND)),
        st.builds(Take, st.integers(0, 4)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(interval_ns=st.integers(0, 2 * SECOND), ops=operations)
def test_properties_no_frame_lost_latest_time_kept_rate_and_latency_bounded(
    interval_ns: int, ops: list[Record | Advance | Take]
) -> None:
    c = ActivityCoalescer(interval_ns)
    now = 0
    recorded_frames: dict[str, int] = defaultdict(int)
    recorded_latest: dict[str, int] = {}
    emitted: list[tuple[str, int, CoalescedActivity]] = []  # (how, now, activity)
    merged_since_emission: dict[str, int] = {}
    last_unforced: dict[str, int] = {}

    def emit(how: str, activities: list[CoalescedActivity]) -> None:
        for a in activities:
            # Each emission carries exactly the latest time merged in since the previous one.
            assert a.latest_at_ns == merged_since_emission.pop(a.connection_id)
            emitted.append((how, now, a))
            if how in ("record", "due"):
                # Rate: unforced emissions of a connection are at least an interval apart.
                previous = last_unforced.get(a.connection_id)
                assert previous is None or now - previous >= interval_ns
                last_unforced[a.connection_id] = now

    for op in ops:
        if isinstance(op, Record):
            cid = f"c{op.connection}"
            at = T0 + op.at_offset
            recorded_frames[cid] += op.frames
            recorded_latest[cid] = max(recorded_latest.get(cid, at), at)
            merged_since_emission[cid] = max(merged_since_emission.get(cid, at), at)
            out = c.record(cid, at, op.frames, now_ns=now)
            emit("record", [out] if out else [])
        elif isinstance(op, Advance):
            now += op.ns
            emit("due", c.due(now))
            # Latency: nothing is left waiting whose interval has ended.
            deadline = c.next_deadline_ns()
            assert deadline is None or deadline > now
            # Memory: only connections that emitted within the last interval are tracked.
            recent = {a.connection_id for how, t, a in emitted if t > now - interval_ns}
            assert len(c) <= len(recent)
        else:
            taken = c.take(f"c{op.connection}")
            emit("take", [taken] if taken else [])
            # A taken (disconnected) connection starts afresh.
            last_unforced.pop(f"c{op.connection}", None)
        # The pending count is exactly the connections with merged, unpublished activity.
        assert c.pending == len(merged_since_emission)
    emit("drain", c.drain())

    # Nothing lost, nothing invented: per connection, frames add up and the latest time is kept.
    emitted_frames: dict[str, int] = defaultdict(int)
    emitted_latest: dict[str, int] = {}
    for _, _, a in emitted:
        emitted_frames[a.connection_id] += a.frames
        emitted_latest[a.connection_id] = max(
            emitted_latest.get(a.connection_id, a.latest_at_ns), a.latest_at_ns
        )
    assert dict(emitted_frames) == dict(recorded_frames)
    assert emitted_latest == recorded_latest
