"""The peer users would pick instead: a Kafka Streams application (bench/kafka-streams/) folding
the same events by the same rules into a state store, measured on the same topic as the
projector, in the same run. A yardstick, not part of the product (BENCHMARKS.md, "Kafka Streams
peer").

The Java application (PeerApp) sources the events topic, decodes each record with classes
generated from proto/conntrack/events/v1/events.proto, drops what the projector would
dead-letter or keep out of connection state (invalid records, a node's own events), and
groupByKey().aggregate()s the rest with fold.py's merge into a RocksDB store (Kafka Streams'
default persistent store, changelogged). It reads the topic's end offsets at start and reports
when its stream threads have processed every record up to them; then it dumps its store, which
is compared with conntrack.core.fold.fold_tuples() of the same topic, every connection.

Its rate counts the records processed from its last move to RUNNING (every task ready) to that
moment (the projector's, from owning every partition to caught up); the JVM's start, the group join,
task set-up and the final commit are reported beside it, not in it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiokafka.admin import AIOKafkaAdminClient

from bench.config import BenchConfig
from bench.consumption import decode_and_fold, projector_catch_up
from bench.infra import fresh_database, fresh_topics, projector_settings, unique
from bench.procstat import CpuUse, CpuWindow
from bench.results import Figure, ScenarioResult
from bench.scenarios.projector import load_mix
from bench.services import REPO
from bench.workloads import Mix, activity_heavy, churn_heavy
from conntrack.audit.log import LogReader
from conntrack.core.events import InvalidEvent, decode_record_tuple
from conntrack.core.fold import ConnectionState, fold_tuples

SOURCE: Final = REPO / "bench" / "kafka-streams"
BUILD: Final = REPO / ".local" / "kafka-streams-peer"
MAIN_CLASS: Final = "conntrack.bench.streams.PeerApp"
# What the build's output depends on: a change to any of these rebuilds it.
_INPUTS: Final = (SOURCE / "pom.xml", SOURCE / "src", REPO / "proto" / "conntrack" / "events")
# A first build on a fresh machine downloads Kafka Streams, RocksDB and protoc (~100 MB).
BUILD_TIMEOUT_S: Final = 900.0


class PeerUnavailable(RuntimeError):
    """The peer cannot be built here (no Java or Maven, or the build failed): one line why."""


def _digest() -> str:
    h = hashlib.sha256()
    for root in _INPUTS:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _classpath(target: Path) -> str:
    return f"{target / 'kafka-streams-peer.jar'}{os.pathsep}{target / 'lib' / '*'}"


def build(timeout_s: float = BUILD_TIMEOUT_S) -> str:
    """Build the peer with Maven once per change of its sources (cached under .local/, guarded
    by a file lock so concurrent callers build it once); returns its java classpath."""
    missing = [tool for tool in ("java", "javac", "mvn") if shutil.which(tool) is None]
    if missing:
        raise PeerUnavailable(
            f"{', '.join(missing)} not found: the Kafka Streams peer needs a Java 17 JDK and Maven"
        )
    BUILD.mkdir(parents=True, exist_ok=True)
    target = BUILD / "target"
    stamp = BUILD / "built-from"
    digest = _digest()
    with (BUILD / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == digest and (target / "lib").is_dir():
            return _classpath(target)
        stamp.unlink(missing_ok=True)
        try:
            proc = subprocess.run(
                ["mvn", "-q", "-B", "package", f"-Dpeer.build.dir={target}"],
                cwd=SOURCE,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise PeerUnavailable(f"mvn package did not finish in {timeout_s:.0f}s") from None
        if proc.returncode != 0:
            log = BUILD / "build.log"
            log.write_text(proc.stdout + proc.stderr)
            raise PeerUnavailable(f"mvn package failed (exit {proc.returncode}); see {log}")
        stamp.write_text(digest)
    return _classpath(target)


@dataclass(frozen=True)
class PeerRun:
    """One run of the peer from an empty state to caught up, as it reported it."""

    threads: int
    store: str
    guarantee: str
    report: dict[str, Any]
    cpu: CpuUse
    wall_seconds: float  # from starting the JVM to its caught-up line

    @property
    def events(self) -> int:
        return int(self.report["records"])

    @property
    def window(self) -> tuple[int, float]:
        """(records, seconds) of the steady window: from the instance's last move to RUNNING
        (every task of every thread ready, as the projector owning every partition) to caught
        up; from its first record if it never reported RUNNING before that."""
        r = self.report
        if r.get("running_to_caught_up_s") is not None:
            events = self.events - int(r["records_before_running"])
            if events > 0:
                return events, float(r["running_to_caught_up_s"])
        return self.events, float(r["first_record_to_caught_up_s"])

    @property
    def rate(self) -> float:
        events, seconds = self.window
        return events / seconds if seconds > 0 else 0.0

    @property
    def settings(self) -> str:
        threads = "1 thread" if self.threads == 1 else f"{self.threads} threads"
        return f"{threads}, {self.store}, {self.guarantee}"


async def _delete_internal_topics(bootstrap: str, application_id: str) -> None:
    """The changelog topic(s) Kafka Streams created for this application id."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(application_id + "-")]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


def _log_path(log_dir: Path, application_id: str) -> Path:
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir / f"kafka-streams-peer-{application_id}.log"


async def run_peer(
    classpath: str,
    bootstrap: str,
    topic: str,
    *,
    threads: int = 1,
    store: str = "rocksdb",
    guarantee: str = "at_least_once",
    dump: Path | None = None,
    log_dir: Path,
    timeout_s: float = 600.0,
) -> PeerRun:
    """Run the peer under a fresh application id (so it starts from the beginning, with an empty
    store) until it has processed the topic up to its end offsets; its changelog topics and
    local state are deleted afterwards."""
    application_id = unique("streams")
    log_path = _log_path(log_dir, application_id)
    argv = [
        "java",
        "-cp",
        classpath,
        MAIN_CLASS,
        *("--bootstrap", bootstrap, "--topic", topic, "--application-id", application_id),
        *("--threads", str(threads), "--store", store, "--guarantee", guarantee),
        *("--timeout-s", str(timeout_s)),
    ]
    if dump is not None:
        argv += ["--dump", str(dump)]
    # Its local state (RocksDB files) goes beside the logs, not under the OS's temp folder
    # (Kafka Streams warns against that), and is deleted with the run.
    with tempfile.TemporaryDirectory(prefix="streams-state-", dir=log_path.parent) as state_dir:
        argv += ["--state-dir", state_dir]
        try:
            with log_path.open("wb") as log:
                started = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=REPO,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                )
                try:
                    cpu = CpuWindow({"kafka-streams peer": proc.pid})
                    assert proc.stdout is not None
                    lines: list[dict[str, Any]] = []
                    use: CpuUse | None = None
                    wall = 0.0
                    async with asyncio.timeout(timeout_s + 180):
                        async for raw in proc.stdout:
                            if not raw.startswith(b"{"):
                                continue  # not the app's own report (a library's print)
                            line = json.loads(raw)
                            if line.get("caught_up") and use is None:
                                wall, use = time.perf_counter() - started, cpu.finish()
                            lines.append(line)
                        code = await proc.wait()
                finally:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
            if code != 0 or use is None or not lines or "records" not in lines[-1]:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(
                    f"the Kafka Streams peer exited with {code}: " + " | ".join(tail)
                )
        finally:
            await _delete_internal_topics(bootstrap, application_id)
    return PeerRun(threads, store, guarantee, lines[-1], use, wall)


async def python_fold(bootstrap: str, topic: str) -> dict[str, ConnectionState]:
    """fold_tuples() of every valid record of the topic, as the projector would fold them."""
    events = []
    async with LogReader(bootstrap, topic) as reader:
        async for batch in reader.read(await reader.full_bounds()):
            for r in batch:
                with contextlib.suppress(InvalidEvent):
                    events.append(decode_record_tuple(r.value, r.key))
    return fold_tuples(events)


def read_dump(path: Path) -> Iterator[ConnectionState]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield ConnectionState(**json.loads(line))


def differences(expected: dict[str, ConnectionState], dump: Path, limit: int = 5) -> list[str]:
    """How the peer's store differs from the Python fold (empty: equal, every connection)."""
    out: list[str] = []
    seen = set()
    for state in read_dump(dump):
        seen.add(state.connection_id)
        want = expected.get(state.connection_id)
        if want != state:
            out.append(f"{state.connection_id}: peer {state}, fold {want}")
    missing = expected.keys() - seen
    out += [f"{cid}: missing from the peer's store" for cid in sorted(missing)[:limit]]
    if len(out) > limit:
        out = [*out[:limit], f"... and {len(out) - limit} more"]
    return out


# Each configuration measured: (threads, store, processing guarantee). The first is the
# reference the others are set beside.
RUNS: Final = (
    (1, "rocksdb", "at_least_once"),
    (2, "rocksdb", "at_least_once"),
    (1, "rocksdb", "exactly_once_v2"),
)


async def compare(cfg: BenchConfig, result: ScenarioResult, mix: Mix) -> None:
    """Load the mix (the records the projector scenario of the same mix loads, byte for byte),
    then on that one topic: fold.py's fold, the Python consume+decode+fold ceiling, the
    projector catching up, and the peer in each of RUNS, its store checked against the fold."""
    try:
        classpath = await asyncio.to_thread(build)
    except PeerUnavailable as exc:
        # Not an error of the product: the run goes on, the table says why nothing was measured.
        result.notes.append(f"skipped: {exc}")
        print(f"bench: {result.name} skipped: {exc}", file=sys.stderr, flush=True)
        return
    async with fresh_topics(cfg, result.name) as (topic, dlq):
        end = await load_mix(cfg, mix, topic, result)
        total = sum(end.values())
        timeout = max(120.0, total / 1_000)
        expected = await python_fold(cfg.kafka, topic)
        fold_only = await decode_and_fold(cfg.kafka, topic, cfg.partitions, total, timeout)
        async with fresh_database(cfg, result.name) as url:
            ours = await projector_catch_up(
                projector_settings(cfg, topic, dlq, url), cfg.partitions, end, timeout
            )
        runs: list[PeerRun] = []
        with tempfile.TemporaryDirectory(prefix="conntrack-streams-dump-") as tmp:
            for i, (threads, store, guarantee) in enumerate(RUNS):
                dump = Path(tmp) / f"store-{i}.jsonl"
                run = await run_peer(
                    classpath,
                    cfg.kafka,
                    topic,
                    threads=threads,
                    store=store,
                    guarantee=guarantee,
                    dump=dump,
                    log_dir=cfg.work_dir / "logs",
                    timeout_s=timeout,
                )
                if run.events != total:
                    raise RuntimeError(f"the peer processed {run.events} of {total} records")
                diff = differences(expected, dump)
                if diff:
                    raise RuntimeError(
                        f"the peer ({run.settings}) folds differently from fold.py: "
                        + "; ".join(diff)
                    )
                runs.append(run)
    _report(result, ours.rate, ours.rows, fold_only.rate, runs, len(expected))
    result.cpu["projector"] = ours.cpu.as_dict()
    if fold_only.cpu is not None:
        result.cpu["consume+decode+fold"] = fold_only.cpu.as_dict()
    for run in runs:
        result.cpu[f"peer {run.settings} (JVM start to caught up)"] = run.cpu.as_dict()


def _report(
    result: ScenarioResult,
    ours: float,
    rows: int,
    fold_only: float,
    runs: list[PeerRun],
    connections: int,
) -> None:
    ref = runs[0]
    peer_label = f"Kafka Streams peer ({ref.settings})"
    result.add(
        Figure(
            "events_per_s",
            "projector events/s into PostgreSQL",
            ours,
            "events/s",
            ref.rate,
            peer_label,
            note="ratio > 1: the projector is faster",
        )
    )
    result.add(
        Figure(
            "fold_events_per_s",
            "  Python consume+decode+fold, no database",
            fold_only,
            "events/s",
            ref.rate,
            peer_label,
        )
    )
    for run in runs:
        result.add(
            Figure(
                f"peer_events_per_s_{run.threads}t_{run.store}_{run.guarantee}",
                f"  Kafka Streams peer, {run.settings}",
                run.rate,
                "events/s",
                None if run is ref else ref.rate,
                "" if run is ref else ref.settings,
                note=f"JVM start to caught up {run.wall_seconds:.1f}s",
            )
        )
    result.params.update(
        projector_rows=rows,
        connections=connections,
        peer_store="RocksDB (Stores.persistentKeyValueStore, changelogged, default cache)",
        peer_runs=[
            {
                "settings": run.settings,
                "events_per_s": round(run.rate),
                "wall_seconds": round(run.wall_seconds, 2),
                **run.report,
            }
            for run in runs
        ],
    )
    result.notes.append(
        f"peer store equal to fold.py's fold of the topic for all {connections:,} connections "
        f"in every run ({', '.join(r.settings for r in runs)})"
    )
    result.notes.append(
        "peer rate: records processed from the instance's last move to RUNNING (all tasks "
        "ready) to every partition processed up to its end offset, over that time; projector: "
        "owning every partition to caught up (JVM start, group joins, task set-up excluded)"
    )


async def run_activity(cfg: BenchConfig, result: ScenarioResult) -> None:
    await compare(cfg, result, activity_heavy(cfg.throughput_events, cfg.seed))


async def run_churn(cfg: BenchConfig, result: ScenarioResult) -> None:
    await compare(cfg, result, churn_heavy(cfg.throughput_events, cfg.seed))
