"""Micro-benchmark of the projector's CPU work before the database: decode, fold, merge.

    .venv/bin/python -m bench.decode_fold [--events N] [--batch N] [--repeat N] [--mix NAME]

The records are the benchmark's own mixes (bench/workloads.py, built from
producer.simulator.generate(): activity-heavy by default, 90% Activity, round-robin over all
live connections), encoded as the producer encodes them. They are cut into batches of the
projector's size (CONNTRACK_BATCH_MAX_EVENTS, 20000 by default) and timed in-process, batch after
batch as the projector's loop handles them, with no Kafka and no database: the figures are the
ceiling that decoding and folding in Python put on the projector.

- decode, fold, decode+fold: the Event path (decode(), fold());
- decode_tuple, fold_tuples, decode_tuple+fold_tuples: the tuple path (decode_tuple(),
  fold_tuples()), which skips building Event objects;
- merge: ProjectionStore's merge of each batch state into its stored row (here: the state of the
  connection's earlier events), once per connection per batch.

The folds and merges get freshly decoded events in every run (untimed), because a string's hash
is computed once and cached: refolding the same objects would flatter them. Each figure is the
best of --repeat runs (the least disturbed by other work on the machine) with the median beside
it; a timing is never a pass/fail check.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.workloads import Mix, Record, activity_heavy, churn_heavy, mixed_history
from conntrack.core.events import decode, decode_tuple
from conntrack.core.fold import ConnectionState, fold, fold_tuples, merge
from conntrack.core.process import BATCH_GEN0_THRESHOLD, tune_gc
from conntrack.core.settings import settings_from

MIXES: dict[str, Callable[[int, int], Mix]] = {
    "activity-heavy": activity_heavy,
    "churn-heavy": churn_heavy,
    "mixed-history": mixed_history,
}

Batches = Sequence[Sequence[Record]]


def _decode(batches: Batches) -> list[list[Any]]:
    return [[decode(value, key) for key, value in batch] for batch in batches]


def _decode_tuples(batches: Batches) -> list[list[Any]]:
    return [[decode_tuple(value, key) for key, value in batch] for batch in batches]


def _decode_each(batches: Batches) -> int:
    """Decode batch after batch, holding one batch at a time, as the projector does."""
    return sum(len([decode(value, key) for key, value in batch]) for batch in batches)


def _decode_tuples_each(batches: Batches) -> int:
    return sum(len([decode_tuple(value, key) for key, value in batch]) for batch in batches)


def _decode_and_fold(batches: Batches) -> int:
    """What the projector's loop does with one getmany() result, batch after batch."""
    return sum(len(fold([decode(value, key) for key, value in batch])) for batch in batches)


def _decode_and_fold_tuples(batches: Batches) -> int:
    return sum(
        len(fold_tuples([decode_tuple(value, key) for key, value in batch])) for batch in batches
    )


def _fold_each(decoded: Sequence[Sequence[Any]]) -> int:
    """Fold batch after batch, dropping each result, as the projector does once written."""
    return sum(len(fold(events)) for events in decoded)


def _fold_tuples_each(decoded: Sequence[Sequence[Any]]) -> int:
    return sum(len(fold_tuples(events)) for events in decoded)


def _merge_into_stored(
    stored: dict[str, ConnectionState], batch_states: Sequence[dict[str, ConnectionState]]
) -> int:
    merged = 0
    for states in batch_states:
        for cid, state in states.items():
            row = stored.get(cid)
            if row is not None:
                merge(row, state)
                merged += 1
    return merged


def _timed(setup: Callable[[], Any], work: Callable[[Any], object], repeat: int) -> list[float]:
    seconds = []
    for _ in range(repeat):
        data = setup()
        gc.collect()
        started = time.perf_counter()
        work(data)
        seconds.append(time.perf_counter() - started)
        del data
    return seconds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode_fold",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=200_000, help="events in the mix")
    parser.add_argument("--batch", type=int, default=20000, help="events per batch")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each measurement")
    parser.add_argument("--mix", choices=sorted(MIXES), default="activity-heavy")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    tune_gc(
        settings_from().gc_gen0_threshold, default=BATCH_GEN0_THRESHOLD
    )  # as the projector's process runs

    mix = MIXES[args.mix](args.events, args.seed)
    records = mix.records()
    batches = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    total = len(records)
    print(f"{mix.name}: {total:,} events ({mix.description}), batches of {args.batch}")

    def stored_and_batch_states() -> tuple[dict[str, ConnectionState], list[Any]]:
        # The stored row of a connection: the fold of its events before the batch. In the
        # activity-heavy mix each connection's Connected comes in an earlier batch.
        per_batch = [fold(events) for events in _decode(batches)]
        stored: dict[str, ConnectionState] = {}
        for states in per_batch:
            for cid, state in states.items():
                stored.setdefault(cid, state)
        return stored, per_batch

    measurements: list[tuple[str, Callable[[], Any], Callable[[Any], object], int]] = [
        ("decode", lambda: batches, _decode_each, total),
        ("fold", lambda: _decode(batches), _fold_each, total),
        ("decode+fold", lambda: batches, _decode_and_fold, total),
        ("decode_tuple", lambda: batches, _decode_tuples_each, total),
        (
            "fold_tuples",
            lambda: _decode_tuples(batches),
            _fold_tuples_each,
            total,
        ),
        ("decode_tuple+fold_tuples", lambda: batches, _decode_and_fold_tuples, total),
    ]
    merges = _merge_into_stored(*stored_and_batch_states())
    measurements.append(
        ("merge (per state)", stored_and_batch_states, lambda d: _merge_into_stored(*d), merges)
    )
    print(f"{'measurement':<26} {'best per s':>14} {'median per s':>14}")
    for name, setup, work, count in measurements:
        seconds = _timed(setup, work, args.repeat)
        best = count / min(seconds)
        median = count / statistics.median(seconds)
        print(f"{name:<26} {best:>14,.0f} {median:>14,.0f}")


if __name__ == "__main__":
    main()
