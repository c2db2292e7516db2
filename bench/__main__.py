"""python -m bench: run the benchmark and print/write its figures.

    python -m bench run [--scale F] [--only NAME,...] [--json PATH]
    python -m bench list
    python -m bench clean [--dry-run]
    python -m bench soak [--minutes 60] [--rate 5000] [--get-rate 500] [--out PATH]

BENCHMARKS.md describes every figure, its ceiling and what limits it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from bench import soak
from bench.config import BenchConfig
from bench.infra import leftovers
from bench.procstat import cpu_count
from bench.results import ScenarioResult, document, render, write_json
from bench.scenarios import (
    ceilings,
    directory,
    fanout,
    freshness,
    get,
    get_rest,
    get_workers,
    history,
    lifecycle,
    memory,
    people,
    projector,
    send,
    streams_peer,
)
from bench.services import REPO
from conntrack.core.batch import gen0_threshold
from conntrack.core.process import tune_gc
from conntrack.core.settings import settings_from

log = logging.getLogger("bench")

# Environment settings whose values must not be copied into a results file.
_SECRET = re.compile(r"TOKEN|PASSWORD|SECRET|KEY|DATABASE_URL|POSTGRES_URL")

Scenario = Callable[[BenchConfig, ScenarioResult], Awaitable[None]]

SCENARIOS: dict[str, tuple[Scenario, str]] = {
    "projector-activity": (
        projector.run_activity,
        "1. projector events/s, activity-heavy mix, vs raw consume / decode+fold / naive",
    ),
    "projector-churn": (
        projector.run_churn,
        "1. projector events/s, churn-heavy mix, vs raw consume / decode+fold / naive",
    ),
    "projector-labels": (
        projector.run_labels,
        "1e. projector events/s, churn-heavy mix with a principal and labels on every "
        "connection, vs the same mix without",
    ),
    "projector-ceilings": (
        ceilings.run,
        "1d. projector vs its no-database and database-only ceilings, per store path and "
        "synchronous_commit",
    ),
    "rebuild": (projector.run_rebuild, "2. rebuild time of 1M events into a fresh database"),
    "get": (get.run, "3. Get QPS, p50, p99 and server CPU vs a constant-answer server"),
    "get-replica": (
        get.run_on_replica,
        "3d. figure 3 with the API reading from a streaming replica (p99 at half load)",
    ),
    "get-workers": (
        get_workers.run,
        "3b. Get QPS with one API worker per core vs the constant server with as many processes",
    ),
    "get-rest": (
        get_rest.run,
        "3c. Get over the REST mapping vs over gRPC on the same server: QPS, p50, p99, CPU/call",
    ),
    "freshness": (freshness.run, "4. publish-to-visible-in-Get p50/p99 at a fixed event rate"),
    "memory": (memory.run, "5. peak RSS of projector and API with 1M live connections"),
    "send": (
        send.run,
        "6. Send at 1k/s through a real gateway node: call-to-frame and call p50/p99 vs plain "
        "Kafka, most sends/s of one API",
    ),
    "send-go": (
        send.run_go,
        "6g. figure 6's steady Sends through the Go gateway node (examples/go-gateway) instead "
        "of conntrack-gateway: call-to-frame and call p50/p99 vs plain Kafka",
    ),
    "directory": (
        directory.run,
        "7. ListConnections p50/p99 of 1,000-connection pages at gateways of 1k/100k/1M",
    ),
    "people": (
        people.run,
        "9. ListConnections by principal and by label selector at 1M connections of 200k "
        "principals, vs the unfiltered page",
    ),
    "fanout": (
        fanout.run,
        "10. SendToConnections to 10,000 connections on 3 gateway nodes: time to the last "
        "outcome, vs a loop of single Sends",
    ),
    "lifecycle": (
        lifecycle.run,
        "11. the lifecycle role's events/s vs the projector's on the same log; a node of 10,000 "
        "sockets SIGKILLed: time to the last closed(node_lost)",
    ),
    "history": (
        history.run,
        "12. ListConnections and CountConnections as_of p50/p99 at 7 days of 1M connections a "
        "day; the history's size on disk per million connections",
    ),
    "streams-peer-activity": (
        streams_peer.run_activity,
        "8. Kafka Streams peer (bench/kafka-streams) folding the activity-heavy topic vs the "
        "projector, store checked against fold.py",
    ),
    "streams-peer-churn": (
        streams_peer.run_churn,
        "8. Kafka Streams peer folding the churn-heavy topic vs the projector, store checked",
    ),
}


def _reachable(hostport: str) -> bool:
    host, _, port = hostport.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return True
    except (OSError, ValueError):
        return False


def _require_servers(cfg: BenchConfig) -> None:
    pg = make_url(cfg.postgres_url)
    for what, hostport, hint in (
        ("Kafka", cfg.kafka, "infra/kafka.sh up"),
        ("PostgreSQL", f"{pg.host}:{pg.port or 5432}", "infra/postgres.sh up"),
    ):
        if not _reachable(hostport):
            sys.exit(f"bench: no {what} at {hostport}; start it with {hint}")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _meta(cfg: BenchConfig, load_generator: str, argv: list[str]) -> dict[str, Any]:
    try:
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
    except (OSError, StopIteration):
        mem_kb = 0
    config = dataclasses.asdict(cfg)
    config["work_dir"] = str(cfg.work_dir)
    config["postgres_url"] = make_url(cfg.postgres_url).render_as_string(hide_password=True)
    return {
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "scale": cfg.scale,
        "argv": argv,
        "host": {
            "cpus": cpu_count(),
            "memory_mb": round(mem_kb * 1024 / 1e6),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_at_start": list(os.getloadavg()),
        },
        "git": {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain"))},
        "load_generator": load_generator,
        "config": config,
        "conntrack_environment": {
            k: "(set)" if _SECRET.search(k) else v
            for k, v in sorted(os.environ.items())
            if k.startswith("CONNTRACK_")
        },
    }


async def run_scenarios(cfg: BenchConfig, names: list[str]) -> list[ScenarioResult]:
    results = []
    for name in names:
        scenario, _ = SCENARIOS[name]
        result = ScenarioResult(name)
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            await scenario(cfg, result)
        except Exception as exc:  # one failing scenario must not hide the others' figures
            result.status = "error"
            result.error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc(file=sys.stderr)
        result.seconds = time.perf_counter() - started
        print(
            f"bench: {name} {result.status} in {result.seconds:.1f}s",
            file=sys.stderr,
            flush=True,
        )
        results.append(result)
    return results


def _parse_only(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or '(none)'}; choose from "
            + ", ".join(SCENARIOS)
        )
    return names


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
        return number

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the scenarios")
    c = sub.add_parser(
        "clean", help="delete conntrack-bench-* topics and databases left by interrupted runs"
    )
    c.add_argument("--dry-run", action="store_true", help="only list them")
    c.add_argument("--kafka", help="bootstrap servers (default 127.0.0.1:19092)")
    c.add_argument("--postgres-url", help="as for run")
    soak.add_arguments(
        sub.add_parser(
            "soak",
            help="run the whole system at a steady load for a long time (default 1 h), record "
            "RSS, lag, freshness, Get p99 and log errors per interval, write JSON + PNG, verdict",
        ),
        _positive(int),
        _positive(float),
    )
    r = sub.add_parser("run", help="run scenarios, print the table, write JSON")
    r.add_argument(
        "--scale",
        type=_positive(float),
        default=1.0,
        help="size factor; 1 = the sizes the issue names (default)",
    )
    r.add_argument("--only", type=_parse_only, help="comma-separated scenarios (default: all)")
    r.add_argument(
        "--json",
        type=Path,
        default=Path("bench-results/latest.json"),
        help="where to write the results (default: bench-results/latest.json)",
    )
    r.add_argument(
        "--kafka", help="bootstrap servers (default 127.0.0.1:19092; env CONNTRACK_BENCH_KAFKA)"
    )
    r.add_argument(
        "--postgres-url",
        help="SQLAlchemy URL of a database on the server used to create "
        "scratch databases (default: what infra/postgres.sh url prints; env "
        "CONNTRACK_BENCH_POSTGRES_URL)",
    )
    r.add_argument(
        "--partitions", type=_positive(int), help="partitions of each events topic (default 6)"
    )
    r.add_argument("--seed", type=int, help="workload seed (default 1)")
    r.add_argument(
        "--get-concurrency", type=_positive(int), help="in-flight Get calls (default 32)"
    )
    r.add_argument(
        "--get-seconds", type=_positive(float), help="length of each Get run (default 10 x scale)"
    )
    r.add_argument(
        "--freshness-rate", type=_positive(int), help="background events/s (default 10000)"
    )
    r.add_argument(
        "--freshness-seconds",
        type=_positive(float),
        help="length of the freshness run (default 20 x scale)",
    )
    r.add_argument("--send-rate", type=_positive(int), help="Send calls/s (default 1000)")
    r.add_argument(
        "--send-seconds", type=_positive(float), help="length of the Send run (default 20 x scale)"
    )
    r.add_argument(
        "--send-clients",
        type=_positive(int),
        help="WebSocket clients on the gateway (default 1000 x scale)",
    )
    r.add_argument(
        "--rebuild-events",
        type=_positive(int),
        help="events to rebuild (default 1M x scale), e.g. 10000000",
    )
    r.add_argument(
        "--naive-seconds",
        type=_positive(float),
        help="time cap of the naive projector (default 30 x scale)",
    )
    r.add_argument(
        "--load-generator",
        choices=("auto", "ghz", "python"),
        help="Get load generator (default auto: ghz if found)",
    )
    r.add_argument("--ghz", help="path of the ghz binary (default: PATH, then $GOPATH/bin)")
    r.add_argument(
        "--loadgen-processes",
        type=_positive(int),
        help="client processes of the python load generator (default 2)",
    )
    r.add_argument(
        "--work-dir", type=Path, help="where service logs go (default bench-results/work)"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ns = parser().parse_args(argv)
    if ns.command == "list":
        for name, (_, description) in SCENARIOS.items():
            print(f"{name:20} {description}")
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    if ns.command == "clean":
        clean_cfg = BenchConfig.from_environment(kafka=ns.kafka, postgres_url=ns.postgres_url)
        topics, databases = asyncio.run(leftovers(clean_cfg, drop=not ns.dry_run))
        verb = "would delete" if ns.dry_run else "deleted"
        print(f"{verb} {len(topics)} topics: {' '.join(topics) or '-'}")
        print(f"{verb} {len(databases)} databases: {' '.join(databases) or '-'}")
        return
    if ns.command == "soak":
        try:
            params = soak.params_from(ns)
        except ValueError as exc:
            sys.exit(f"bench soak: {exc}")
        soak_cfg = BenchConfig.from_environment(
            kafka=ns.kafka,
            postgres_url=ns.postgres_url,
            partitions=ns.partitions,
            seed=ns.seed,
            work_dir=ns.work_dir,
            load_generator=ns.load_generator,
            ghz_path=ns.ghz,
        )
        _require_servers(soak_cfg)
        try:
            generator = get.load_generator(soak_cfg).name
        except RuntimeError as exc:
            sys.exit(f"bench soak: {exc}")
        meta = _meta(soak_cfg, generator, argv)
        sys.exit(soak.main(soak_cfg, params, meta, ns.out or soak.default_out()))
    cfg = BenchConfig.from_environment(
        scale=ns.scale,
        kafka=ns.kafka,
        postgres_url=ns.postgres_url,
        partitions=ns.partitions,
        seed=ns.seed,
        get_concurrency=ns.get_concurrency,
        get_seconds_override=ns.get_seconds,
        freshness_rate=ns.freshness_rate,
        freshness_seconds_override=ns.freshness_seconds,
        send_rate=ns.send_rate,
        send_seconds_override=ns.send_seconds,
        send_clients_override=ns.send_clients,
        rebuild_events_override=ns.rebuild_events,
        naive_seconds_override=ns.naive_seconds,
        load_generator=ns.load_generator,
        ghz_path=ns.ghz,
        loadgen_processes=ns.loadgen_processes,
        work_dir=ns.work_dir,
    )
    _require_servers(cfg)
    names = ns.only or list(SCENARIOS)
    try:
        generator = get.load_generator(cfg).name
    except RuntimeError as exc:
        sys.exit(f"bench: {exc}")
    meta = _meta(cfg, generator, argv)
    # What a commit costs on the server decides the database's share of every figure.
    meta["postgres_settings"] = asyncio.run(ceilings.server_settings(cfg.postgres_url))
    print(
        "bench: PostgreSQL " + ", ".join(f"{k}={v}" for k, v in meta["postgres_settings"].items()),
        file=sys.stderr,
        flush=True,
    )
    # The in-process projector and rebuild run under the collector settings their commands use
    # (and so do the ceilings measured beside them, in this same process).
    harness = settings_from()
    tune_gc(harness.gc_gen0_threshold, default=gen0_threshold(harness.batch_max_events))
    try:
        results = asyncio.run(run_scenarios(cfg, names))
    except KeyboardInterrupt:
        # asyncio.run has cancelled the scenario, whose cleanup (topics, databases) ran.
        print("bench: interrupted; no results written", file=sys.stderr)
        sys.exit(130)
    meta["finished_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    doc = document(meta, results)
    write_json(ns.json, doc)
    print(render(doc, results))
    print(f"\nJSON written to {ns.json}")
    sys.exit(0 if all(r.status == "ok" for r in results) else 1)


if __name__ == "__main__":
    main()
