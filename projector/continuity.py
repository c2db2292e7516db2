"""Which fetched records a batch may apply: the invariant exactly-once rests on.

A batch may move a partition's stored position from p to q only if it applied every record the
log holds in [p, q). The consumer hands records over in offset order, but where its read of a
partition began is only as good as the last seek: records fetched from anywhere else (the
group's committed offset before the assignment listener's seek, a position left over from an
earlier read) must never be committed as if they followed p.

Kafka itself leaves some offsets without a record a consumer sees: transaction markers (and
aborted records), and offsets removed by compaction. Inside one continuous read such holes are
Kafka's, never ours. At the start of a batch they are told apart from a read that began in the
wrong place by reading again: a partition whose records do not begin at p is sought to p; if the
first records of that read still begin past p, the log holds nothing in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class _Offset(Protocol):
    @property
    def offset(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Run:
    """What a batch takes of one partition's fetched records."""

    records: list[Any]  # to apply, in offset order, all at or past the start
    end: int  # the position the batch leaves the partition at
    below: int  # records before the start (applied already): skipped
    unused: int  # offsets in [start, end) Kafka holds no record for (markers, compaction)
    gap: bool  # the records do not begin at the start: none taken, read the partition again


def run_from(
    records: Sequence[_Offset], start: int, *, read_from: int | None, reached: int | None
) -> Run:
    """The records of one continuous read of a partition that a batch starting at `start` may
    apply. read_from: the offset this read was sought to (None: not known); reached: the
    consumer's position after handing these records over (None: not known), which passes
    markers that follow the last record."""
    fresh: list[Any] = []
    cursor = start
    below = 0
    for record in records:
        if record.offset < cursor:
            below += 1  # applied already, or handed over twice
            continue
        if not fresh and record.offset != start and read_from != start:
            return Run([], start, below, 0, gap=True)
        fresh.append(record)
        cursor = record.offset + 1
    if not fresh:
        return Run([], start, below, 0, gap=False)
    end = max(cursor, reached) if reached is not None else cursor
    return Run(fresh, end, below, end - start - len(fresh), gap=False)
