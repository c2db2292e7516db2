"""Figure 1 (projector throughput, two mixes) and figure 2 (rebuild time).

Throughput is measured from the moment the projector owns every partition to the moment its
stored positions reach the topic's end offsets, so group joining is not counted as slowness;
the rebuild time counts everything from constructing the projector."""

from __future__ import annotations

import gc
import time

from bench.config import BenchConfig
from bench.consumption import (
    Timed,
    decode_and_fold,
    naive_projector,
    processes_catch_up,
    projector_catch_up,
    raw_consume,
    rebuild,
)
from bench.infra import end_offsets, fresh_database, fresh_topics, projector_settings
from bench.results import Figure, ScenarioResult, TargetCheck, at_least, at_most, fmt
from bench.workloads import (
    Mix,
    activity_heavy,
    churn_heavy,
    churn_labelled,
    mixed_history,
    publish_records,
)

ACTIVITY_TARGET_EVENTS_PER_S = 100_000
RAW_RATIO_TARGET = 0.5
REBUILD_TARGET_SECONDS = 15.0
REBUILD_TARGET_EVENTS = 1_000_000


def _timeout(events: int) -> float:
    """Generous: a projector slower than 1k events/s has a problem worth an error of its own."""
    return max(60.0, events / 1_000)


async def load_mix(
    cfg: BenchConfig, mix: Mix, topic: str, result: ScenarioResult
) -> dict[int, int]:
    """Publish the mix into topic and record what was loaded; the topic's end offsets."""
    started = time.perf_counter()
    count = await publish_records(cfg.kafka, topic, mix.iter_records())
    end = await end_offsets(cfg.kafka, topic, cfg.partitions)
    if sum(end.values()) != count:
        raise RuntimeError(f"loaded {count} records but the topic ends at {end}")
    result.params.update(
        mix=mix.description,
        events=count,
        partitions=cfg.partitions,
        load_seconds=round(time.perf_counter() - started, 2),
    )
    # Generating the events left garbage behind; collect it now, not inside a timed window.
    gc.collect()
    return end


async def throughput(cfg: BenchConfig, result: ScenarioResult, mix: Mix) -> None:
    async with fresh_topics(cfg, result.name) as (topic, dlq):
        end = await load_mix(cfg, mix, topic, result)
        total = sum(end.values())
        timeout = _timeout(total)
        raw = await raw_consume(cfg.kafka, topic, cfg.partitions, total, timeout)
        cpu_bound = await decode_and_fold(cfg.kafka, topic, cfg.partitions, total, timeout)
        async with fresh_database(cfg, "naive") as url:
            naive = await naive_projector(
                cfg.kafka, topic, cfg.partitions, url, cfg.naive_events, cfg.naive_seconds
            )
        async with fresh_database(cfg, result.name) as url:
            run = await projector_catch_up(
                projector_settings(cfg, topic, dlq, url), cfg.partitions, end, timeout
            )
        # Scale-out on the same machine: one process, then two in one group, both measured from
        # starting the processes to caught up.
        group: dict[int, Timed] = {}
        for processes in (1, 2):
            async with fresh_database(cfg, f"{result.name}-{processes}p") as url:
                group[processes] = await processes_catch_up(
                    projector_settings(cfg, topic, dlq, url),
                    end,
                    processes,
                    cfg.work_dir / "logs",
                    timeout,
                )
    result.params.update(rows=run.rows, assignment_seconds=round(run.assignment_seconds, 3))
    label = "projector events/s into PostgreSQL"
    main = result.add(
        Figure("events_per_s", label, run.rate, "events/s", raw.rate, "raw aiokafka consume")
    )
    result.add(
        Figure(
            "events_per_s_vs_cpu",
            label,
            run.rate,
            "events/s",
            cpu_bound.rate,
            "consume+decode+fold, no database",
        )
    )
    result.add(
        Figure(
            "events_per_s_vs_naive",
            label,
            run.rate,
            "events/s",
            naive.rate,
            "naive: 1 commit per event",
            note=f"naive measured over the first {naive.events:,} events ({naive.seconds:.1f}s)",
        )
    )
    result.notes.append(
        f"naive projector measured over the first {naive.events:,} of {total:,} events "
        f"({naive.seconds:.1f}s); ratio vs naive reads as a speed-up"
    )
    result.add(
        Figure(
            "two_processes_events_per_s",
            "  2 conntrack-projector processes in one group",
            group[2].rate,
            "events/s",
            group[1].rate,
            "1 process, measured the same way",
            note="from starting the processes to caught up: start-up and group joins included",
        )
    )
    result.cpu["projector"] = run.cpu.as_dict()
    for processes, timed in group.items():
        assert timed.cpu is not None
        result.cpu[f"{processes} projector process(es)"] = timed.cpu.as_dict()
    result.cpu["raw consume"] = raw.cpu.as_dict() if raw.cpu else {}
    result.cpu["naive"] = naive.cpu.as_dict() if naive.cpu else {}
    if mix.name == "activity-heavy":
        result.targets.append(
            at_least(main.value, ACTIVITY_TARGET_EVENTS_PER_S, ">= 100,000 events/s", " events/s")
        )
    assert main.ratio is not None
    result.targets.append(
        TargetCheck(
            ">= 50% of the raw consume rate",
            f"{main.ratio:.0%}",
            main.ratio >= RAW_RATIO_TARGET,
        )
    )


async def run_activity(cfg: BenchConfig, result: ScenarioResult) -> None:
    await throughput(cfg, result, activity_heavy(cfg.throughput_events, cfg.seed))


async def run_churn(cfg: BenchConfig, result: ScenarioResult) -> None:
    await throughput(cfg, result, churn_heavy(cfg.throughput_events, cfg.seed))


async def run_labels(cfg: BenchConfig, result: ScenarioResult) -> None:
    """Figure 1e: the churn-heavy mix with a principal and two labels on every connection
    beside the same mix without, each projected into a fresh database by one projector: what
    keeping the label index (core/store.py, _index_labels) costs the projector."""
    rates: dict[str, float] = {}
    runs: list[dict[str, object]] = []
    for mix in (
        churn_heavy(cfg.throughput_events, cfg.seed),
        churn_labelled(cfg.throughput_events, cfg.seed),
    ):
        async with fresh_topics(cfg, f"{result.name}-{len(rates)}") as (topic, dlq):
            end = await load_mix(cfg, mix, topic, result)
            async with fresh_database(cfg, f"{result.name}-{len(rates)}") as url:
                run = await projector_catch_up(
                    projector_settings(cfg, topic, dlq, url),
                    cfg.partitions,
                    end,
                    _timeout(sum(end.values())),
                )
        rates[mix.name] = run.rate
        result.cpu[mix.name] = run.cpu.as_dict()
        runs.append({"mix": mix.name, "events": sum(end.values()), "rows": run.rows})
    result.params["runs"] = runs
    plain, labelled = rates.values()
    result.add(
        Figure(
            "labelled_events_per_s",
            "projector events/s into PostgreSQL, churn-heavy, every connection labelled",
            labelled,
            "events/s",
            plain,
            "the same mix without principals or labels",
        )
    )


async def run_rebuild(cfg: BenchConfig, result: ScenarioResult) -> None:
    mix = mixed_history(cfg.rebuild_events, cfg.seed)
    async with fresh_topics(cfg, result.name) as (topic, dlq):
        end = await load_mix(cfg, mix, topic, result)
        total = sum(end.values())
        raw = await raw_consume(cfg.kafka, topic, cfg.partitions, total, _timeout(total))
        async with fresh_database(cfg, result.name) as url:
            run = await rebuild(cfg.kafka, topic, url)
        async with fresh_database(cfg, "catch-up") as url:
            catch_up = await projector_catch_up(
                projector_settings(cfg, topic, dlq, url), cfg.partitions, end, _timeout(total)
            )
    if run.rows != catch_up.rows:
        raise RuntimeError(f"rebuild made {run.rows} rows, the projector {catch_up.rows}")
    result.params["rows"] = run.rows
    seconds = result.add(
        Figure(
            "rebuild_seconds",
            f"rebuild {total:,} events (conntrack-audit rebuild, switch included)",
            run.seconds,
            "s",
            raw.seconds,
            "raw aiokafka read of the same topic",
            note="ratio = times slower than only reading the log",
        )
    )
    result.add(
        Figure(
            "events_per_s",
            "  rebuild rate",
            run.rate,
            "events/s",
            raw.rate,
            "raw aiokafka consume",
        )
    )
    result.add(
        Figure(
            "catch_up_seconds",
            "  a new projector catching up on the same log",
            catch_up.total_seconds,
            "s",
            note=f"of which {catch_up.assignment_seconds:.1f}s starting and joining its group",
        )
    )
    result.cpu["rebuild"] = run.cpu.as_dict()
    result.cpu["projector catch-up"] = catch_up.cpu.as_dict()
    budget = REBUILD_TARGET_SECONDS * total / REBUILD_TARGET_EVENTS
    check = at_most(seconds.value, budget, "1M events within 15 s", " s")
    if total != REBUILD_TARGET_EVENTS:
        check.target = f"{total:,} events within {fmt(budget)} s"
        check.note = "pro rata of 15 s per 1M events"
    result.targets.append(check)
