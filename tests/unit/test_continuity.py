"""projector/continuity.py: which fetched records a batch may apply."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from conntrack.projector.continuity import run_from


@dataclass(frozen=True)
class R:
    offset: int


def rs(*offsets: int) -> list[R]:
    return [R(o) for o in offsets]


def test_records_beginning_at_the_position_are_taken() -> None:
    run = run_from(rs(10, 11, 12), 10, read_from=None, reached=None)
    assert (run.records, run.end, run.below, run.unused, run.gap) == (
        rs(10, 11, 12),
        13,
        0,
        0,
        False,
    )


def test_records_before_the_position_are_skipped() -> None:
    run = run_from(rs(8, 9, 10, 11), 10, read_from=0, reached=None)
    assert (run.records, run.end, run.below, run.gap) == (rs(10, 11), 12, 2, False)


def test_records_beginning_past_the_position_are_a_gap_unless_read_from_it() -> None:
    # The read began elsewhere (the group's offset, an older position): not applied.
    for read_from in (None, 0, 9, 11, 1720):
        run = run_from(rs(1720, 1721), 10, read_from=read_from, reached=None)
        assert (run.records, run.end, run.gap) == ([], 10, True)
    # Read again from exactly the position: Kafka holds nothing in between.
    run = run_from(rs(12, 13), 10, read_from=10, reached=None)
    assert (run.records, run.end, run.unused, run.gap) == (rs(12, 13), 14, 2, False)


def test_holes_inside_one_read_are_kafkas_own() -> None:
    run = run_from(rs(10, 11, 14, 15), 10, read_from=3, reached=None)
    assert (run.records, run.end, run.unused, run.gap) == (rs(10, 11, 14, 15), 16, 2, False)


def test_the_consumers_position_passes_markers_after_the_last_record() -> None:
    run = run_from(rs(10, 11), 10, read_from=None, reached=13)
    assert (run.end, run.unused) == (13, 1)
    assert run_from(rs(10, 11), 10, read_from=None, reached=11).end == 12


def test_nothing_fresh_moves_nothing() -> None:
    run = run_from(rs(3, 4), 10, read_from=0, reached=5)
    assert (run.records, run.end, run.below, run.gap) == ([], 10, 2, False)


@st.composite
def reads(draw: st.DrawFn) -> tuple[list[int], int, int, int]:
    """A log with holes (offsets Kafka holds no record for), a read of it from some offset as
    the consumer hands it over (every record from there on, in order, cut anywhere), and the
    position a batch starts from."""
    offsets = sorted(draw(st.sets(st.integers(0, 60), max_size=40)))
    log_end = (offsets[-1] + 1 if offsets else 0) + draw(st.integers(0, 3))
    read_from = draw(st.integers(0, log_end))
    start = draw(st.integers(0, log_end))
    return offsets, log_end, read_from, start


@given(reads(), st.data())
def test_whatever_is_taken_is_exactly_the_log_between_start_and_end(
    case: tuple[list[int], int, int, int], data: st.DataObject
) -> None:
    offsets, log_end, read_from, start = case
    handed = [o for o in offsets if o >= read_from]
    cut = data.draw(st.integers(0, len(handed)))
    taken = handed[:cut]
    # The consumer's position after them: past the holes that follow, if it read to the end.
    reached = log_end if cut == len(handed) else (taken[-1] + 1 if taken else read_from)
    run = run_from(rs(*taken), start, read_from=read_from, reached=reached)
    if run.gap:
        # Only a read that did not pass through the start is refused.
        assert read_from != start
        assert run.records == []
        assert run.end == start
        return
    applied = [r.offset for r in run.records]
    assert applied == [o for o in offsets if start <= o < run.end]
    assert run.end >= start
    assert run.unused == run.end - start - len(applied)
    if read_from == start:
        assert not run.gap
