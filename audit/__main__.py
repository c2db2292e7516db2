"""conntrack-audit: replay history for audits.

history ID            a connection's full ordered event timeline (table or JSON lines)
as-of TIME            the read model as the system knew it at TIME, into a separate database
                      (an SQLite file by default); with --connection, one connection's state
verify                fold history afresh and compare with the live read model; exits 1 on
                      any divergence
rebuild               rebuild the live read model from the beginning of history into shadow
                      tables and switch to them atomically once caught up, while the projector
                      and the API keep running (docs/rebuild.md); resumes if interrupted
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from audit.log import LogReader
from audit.rebuild import Progress, Rebuild, RebuildError, abandon, drop_retired, shadow_exists
from audit.replay import HistoryEntry, fold_until, history, state_of, verify
from connection_tracker.database import create_engine
from connection_tracker.fold import ConnectionState
from connection_tracker.lifecycle import BATCH_GEN0_THRESHOLD, setup_logging, tune_gc
from connection_tracker.settings import Settings, settings_from
from connection_tracker.store import ProjectionStore
from connection_tracker.timeutil import format_ns
from migrations.cli import upgrade


def parse_time_ms(text: str) -> int:
    """RFC 3339 / ISO 8601 (naive means UTC), or integer milliseconds since the epoch."""
    if text.isdigit():
        return int(text)
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def entry_json(e: HistoryEntry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "partition": e.partition,
        "offset": e.offset,
        "log_timestamp_ms": e.log_timestamp_ms,
    }
    if e.event is None:
        out["invalid"] = e.error
        return out
    ev = e.event
    out |= {
        "event_id": ev.event_id,
        "kind": ev.kind,
        "occurred_at": format_ns(ev.occurred_at_ns),
        "occurred_at_ns": ev.occurred_at_ns,
        "gateway_id": ev.gateway_id,
        **dataclasses.asdict(ev.payload),
    }
    return out


def state_json(state: ConnectionState) -> dict[str, Any]:
    out = state._asdict()
    for name in ("connected_at_ns", "last_active_at_ns", "disconnected_at_ns"):
        if out[name] is not None:
            out[name.removesuffix("_ns")] = format_ns(out[name])
    return out


_TABLE_COLUMNS = frozenset(
    {"partition", "offset", "log_timestamp_ms", "kind", "occurred_at", "occurred_at_ns"}
)


async def cmd_history(settings: Settings, ns: argparse.Namespace) -> int:
    found = 0
    async with LogReader(settings.kafka_bootstrap_servers, settings.events_topic) as reader:
        async for entry in history(reader, ns.connection_id, until_ms=ns.until):
            found += 1
            if ns.format == "jsonl":
                print(json.dumps(entry_json(entry), ensure_ascii=False))
                continue
            if found == 1:
                print(f"{'partition':>9} {'offset':>10}  {'occurred_at':<31} {'kind':<12} details")
            j = entry_json(entry)
            where = f"{entry.partition:>9} {entry.offset:>10}"
            if entry.event is None:
                print(f"{where}  {'-':<31} {'INVALID':<12} {entry.error}")
                continue
            details = {k: v for k, v in j.items() if k not in _TABLE_COLUMNS}
            print(
                f"{where}  {j['occurred_at']:<31} {j['kind']:<12} "
                + json.dumps(details, ensure_ascii=False)
            )
    if not found:
        print(f"no events for connection {ns.connection_id}", file=sys.stderr)
        return 1
    return 0


async def cmd_as_of(settings: Settings, ns: argparse.Namespace) -> int:
    async with LogReader(settings.kafka_bootstrap_servers, settings.events_topic) as reader:
        if ns.connection:
            state = await state_of(reader, ns.connection, until_ms=ns.time)
            if state is None:
                print(f"no events for connection {ns.connection} before that time", file=sys.stderr)
                return 1
            print(json.dumps(state_json(state), indent=2, ensure_ascii=False))
            return 0
        replay = await fold_until(reader, ns.time)
    url = ns.output_url or f"sqlite+aiosqlite:///{ns.output or f'as-of-{ns.time}.db'}"
    await asyncio.to_thread(upgrade, url)
    engine = create_engine(url)
    try:
        store = ProjectionStore(engine)
        stored = await store.positions(settings.events_topic, replay.bounds)
        if any(stored.values()):
            print(f"error: {url} already holds a projection; use a new file", file=sys.stderr)
            return 1
        await store.apply_batch(
            settings.events_topic,
            {p: (0, end) for p, (_, end) in replay.bounds.items()},
            replay.states,
        )
    finally:
        await engine.dispose()
    cut = {p: end for p, (_, end) in sorted(replay.bounds.items())}
    print(
        f"wrote {len(replay.states)} connections ({replay.events} events, "
        f"{replay.invalid} invalid) as of {ns.time} ms to {url}; cut offsets {cut}"
    )
    return 0


async def cmd_verify(settings: Settings, ns: argparse.Namespace) -> int:
    engine = create_engine(settings.database_url)
    try:
        async with LogReader(settings.kafka_bootstrap_servers, settings.events_topic) as reader:
            result = await verify(engine, reader)
    finally:
        await engine.dispose()
    print(
        f"compared {result.compared} connections "
        f"({result.events} events, {result.invalid} invalid, "
        f"{result.pruned} pruned by retention) "
        f"up to stored positions {dict(sorted(result.positions.items()))}"
    )
    if result.ok:
        print("OK: the read model equals a fresh fold of the log")
        return 0
    print(f"DIVERGED: {len(result.differences)} connections differ", file=sys.stderr)
    for d in result.differences[: ns.examples]:
        print(
            json.dumps(
                {
                    "connection_id": d.connection_id,
                    "live": d.live and state_json(d.live),
                    "replayed": d.replayed and state_json(d.replayed),
                },
                ensure_ascii=False,
            ),
            file=sys.stderr,
        )
    return 1


async def cmd_rebuild(settings: Settings, ns: argparse.Namespace) -> int:
    engine = create_engine(settings.database_url)
    try:
        if ns.abandon or ns.drop_retired:
            if ns.abandon:
                done = await abandon(engine)
                print("dropped the shadow tables" if done else "no shadow tables to drop")
            if ns.drop_retired:
                done = await drop_retired(engine)
                print("dropped the retired tables" if done else "no retired tables to drop")
            return 0
        last_print = 0.0

        def show(progress: Progress) -> None:
            nonlocal last_print
            now = time.monotonic()
            if now - last_print >= ns.progress_interval:
                last_print = now
                print(progress.line(now), file=sys.stderr, flush=True)

        async with LogReader(settings.kafka_bootstrap_servers, settings.events_topic) as reader:
            rebuild = Rebuild(
                engine,
                reader,
                batch_events=ns.batch_events,
                max_events_per_second=ns.max_events_per_second,
                max_switch_gap=ns.max_switch_gap,
                lock_timeout_seconds=ns.lock_timeout,
                switch=not ns.no_switch,
                on_batch=show,
            )
            if await shadow_exists(engine):
                print("resuming the interrupted rebuild in the shadow tables", file=sys.stderr)
            try:
                result = await rebuild.run()
            except RebuildError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        print(rebuild.progress.line(), file=sys.stderr)
    finally:
        await engine.dispose()
    positions = dict(sorted(result.positions.items()))
    if ns.no_switch:
        print(f"shadow caught up at positions {positions}; not switched (--no-switch)")
        return 0
    print(
        f"switched: the read model is now a fresh fold of {settings.events_topic} up to "
        f"positions {positions} ({result.events} events folded by this run, {result.invalid} "
        f"invalid skipped{', resumed' if result.resumed else ''}; switch attempts "
        f"{result.switch_attempts}, writers held {result.switch_seconds:.3f} s); "
        "the previous generation is kept in the *_retired tables"
    )
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="conntrack-audit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bootstrap-servers", help="overrides CONNTRACK_KAFKA_BOOTSTRAP_SERVERS")
    parser.add_argument("--topic", help="overrides CONNTRACK_EVENTS_TOPIC")
    parser.add_argument("--database-url", help="overrides CONNTRACK_DATABASE_URL (verify, rebuild)")
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("history", help="a connection's ordered event timeline")
    h.add_argument("connection_id")
    h.add_argument("--format", choices=("table", "jsonl"), default="table")
    h.add_argument("--until", type=parse_time_ms, help="only what the log held before this time")
    a = sub.add_parser("as-of", help="reconstruct the read model as of a time")
    a.add_argument("time", type=parse_time_ms, help="RFC 3339 time or epoch milliseconds")
    a.add_argument("--output", help="SQLite file to create (default as-of-<ms>.db)")
    a.add_argument("--output-url", help="any SQLAlchemy async URL instead of --output")
    a.add_argument("--connection", help="print only this connection's state as JSON")
    v = sub.add_parser("verify", help="compare the live read model with a fresh fold")
    v.add_argument("--examples", type=int, default=10, help="differences to print")
    r = sub.add_parser(
        "rebuild", help="rebuild the live read model without downtime (docs/rebuild.md)"
    )
    r.add_argument("--batch-events", type=int, default=20_000, help="records per shadow commit")
    r.add_argument(
        "--max-events-per-second",
        type=float,
        help="throttle the rebuild to spare the database (default: as fast as it goes)",
    )
    r.add_argument(
        "--max-switch-gap",
        type=int,
        default=2_000,
        help="switch only when the live projection is at most this many records ahead "
        "(they are folded while the live writers wait)",
    )
    r.add_argument(
        "--lock-timeout",
        type=float,
        default=2.0,
        help="PostgreSQL: seconds a switch waits for its locks before retrying",
    )
    r.add_argument("--progress-interval", type=float, default=2.0, help="seconds between lines")
    r.add_argument("--no-switch", action="store_true", help="stop once caught up; do not switch")
    r.add_argument(
        "--abandon", action="store_true", help="drop the shadow tables of an unfinished rebuild"
    )
    r.add_argument(
        "--drop-retired", action="store_true", help="drop the generation a switch retired"
    )
    ns = parser.parse_args(argv)
    settings = settings_from(
        kafka_bootstrap_servers=ns.bootstrap_servers,
        events_topic=ns.topic,
        database_url=ns.database_url,
    )
    setup_logging("WARNING")
    tune_gc(settings.gc_gen0_threshold, default=BATCH_GEN0_THRESHOLD)
    handler = {
        "history": cmd_history,
        "as-of": cmd_as_of,
        "verify": cmd_verify,
        "rebuild": cmd_rebuild,
    }[ns.command]
    try:
        sys.exit(asyncio.run(handler(settings, ns)))
    except KeyboardInterrupt:
        if ns.command == "rebuild":
            print(
                "interrupted: the shadow tables keep every committed batch; run "
                "`conntrack-audit rebuild` again to resume (or --abandon)",
                file=sys.stderr,
            )
        sys.exit(130)


if __name__ == "__main__":
    main()
