"""conntrack-audit: replay history for audits.

history ID            a connection's full ordered event timeline (table or JSON lines)
as-of TIME            the read model as the system knew it at TIME, into a separate database
                      (an SQLite file by default); with --connection, one connection's state;
                      with --clock event, of the events that occurred by TIME
verify                fold history afresh and compare with the live read model; exits 1 on
                      any divergence

Exit codes: 0 done; 1 a negative answer (no events, a divergence, a refused output, a rebuild
that cannot go on); 2 a bad flag or setting; 69 the broker or database unreachable; 130
interrupted (SIGINT or SIGTERM).
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
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import make_url

from conntrack.audit.generations import RebuildError, abandon, drop_retired, shadow_exists
from conntrack.audit.log import LogReader, TopicNotFoundError
from conntrack.audit.rebuild import Progress, Rebuild
from conntrack.audit.replay import (
    HistoryEntry,
    fold_by_event_time,
    fold_until,
    history,
    state_of,
    verify,
)
from conntrack.core import cli
from conntrack.core.batch import gen0_threshold
from conntrack.core.database import create_engine
from conntrack.core.fold import ConnectionState, apply
from conntrack.core.kafka import KafkaConnection
from conntrack.core.labels import from_json
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.core.timeutil import format_ns
from conntrack.migrations.cli import upgrade


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
    if "labels" in out:
        out["labels"] = dict(out["labels"])
    return out


def state_json(state: ConnectionState) -> dict[str, Any]:
    out = state._asdict()
    out["labels"] = from_json(state.labels)
    for name in ("connected_at_ns", "last_active_at_ns", "disconnected_at_ns"):
        if out[name] is not None:
            out[name.removesuffix("_ns")] = format_ns(out[name])
    return out


_TABLE_COLUMNS = frozenset(
    {"partition", "offset", "log_timestamp_ms", "kind", "occurred_at", "occurred_at_ns"}
)


async def cmd_history(settings: Settings, ns: argparse.Namespace) -> int:
    found = 0
    async with LogReader(
        KafkaConnection.from_settings(settings, "audit"), settings.events_topic
    ) as reader:
        async for entry in history(reader, ns.connection_id, until_ms=ns.until):
            found += 1
            if ns.format in ("json", "jsonl"):
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
        return cli.Exit.NEGATIVE
    return cli.Exit.OK


async def _clock_note(reader: LogReader) -> str:
    """The events topic's timestamp type; on stderr, what it means for an as-of answer when it is
    not LogAppendTime. The answer is still given (an old topic's history is worth reading), but
    it must not pass for what the log held at T: the records' times are the gateways' clocks."""
    clock = await reader.timestamp_type()
    if clock != "LogAppendTime":
        print(
            f"note: {reader.topic} has message.timestamp.type={clock}: records are cut by the "
            "time their gateway stamped on them, so the answer follows the gateways' clocks, "
            "not exactly what the log held at that time (conntrack-producer topics creates the "
            "events topic with LogAppendTime)",
            file=sys.stderr,
        )
    return clock


async def cmd_as_of(settings: Settings, ns: argparse.Namespace) -> int:
    async with LogReader(
        KafkaConnection.from_settings(settings, "audit"), settings.events_topic
    ) as reader:
        by_event = ns.clock == "event"
        if ns.connection and by_event:
            state = None
            async for entry in history(reader, ns.connection):
                if entry.event is not None and entry.event.occurred_at_ns <= ns.time * 1_000_000:
                    state = apply(state, entry.event)
            if state is None:
                print(f"no events for connection {ns.connection} by that time", file=sys.stderr)
                return cli.Exit.NEGATIVE
            print(json.dumps(state_json(state), indent=2, ensure_ascii=False))
            return cli.Exit.OK
        if ns.connection:
            state = await state_of(reader, ns.connection, until_ms=ns.time)
            await _clock_note(reader)
            if state is None:
                print(f"no events for connection {ns.connection} before that time", file=sys.stderr)
                return cli.Exit.NEGATIVE
            print(json.dumps(state_json(state), indent=2, ensure_ascii=False))
            return cli.Exit.OK
        progress = _progress("as-of", ns.progress_interval)
        if by_event:
            replay = await fold_by_event_time(reader, ns.time * 1_000_000, progress)
            clock = "event"
        else:
            replay = await fold_until(reader, ns.time, progress)
            clock = await _clock_note(reader)
    url = ns.output_url or f"sqlite+aiosqlite:///{ns.output or f'as-of-{ns.time}.db'}"
    await asyncio.to_thread(upgrade, url)
    engine = create_engine(url)
    try:
        store = ProjectionStore(engine)
        stored = await store.positions(settings.events_topic, replay.bounds)
        if any(stored.values()):
            print(f"error: {url} already holds a projection; use a new file", file=sys.stderr)
            return cli.Exit.NEGATIVE
        await store.apply_batch(
            settings.events_topic,
            {p: (0, end) for p, (_, end) in replay.bounds.items()},
            replay.states,
            replay.nodes,
        )
    finally:
        await engine.dispose()
    cut = {p: end for p, (_, end) in sorted(replay.bounds.items())}
    if ns.format == "json":
        print(
            json.dumps(
                {
                    "connections": len(replay.states),
                    "events": replay.events,
                    "invalid": replay.invalid,
                    "as_of_ms": ns.time,
                    "timestamp_type": clock,
                    "output_url": make_url(url).render_as_string(hide_password=True),
                    "cut_offsets": {str(p): o for p, o in cut.items()},
                }
            )
        )
        return cli.Exit.OK
    print(
        f"wrote {len(replay.states)} connections ({replay.events} events, "
        f"{replay.invalid} invalid) as of {ns.time} ms to {url}; cut offsets {cut}"
    )
    return cli.Exit.OK


async def cmd_verify(settings: Settings, ns: argparse.Namespace) -> int:
    engine = create_engine(settings.database_url)
    try:
        async with LogReader(
            KafkaConnection.from_settings(settings, "audit"), settings.events_topic
        ) as reader:
            result = await verify(engine, reader, _progress("verify", ns.progress_interval))
    finally:
        await engine.dispose()
    if ns.format == "json":
        print(
            json.dumps(
                {
                    "ok": result.ok,
                    "compared": result.compared,
                    "events": result.events,
                    "invalid": result.invalid,
                    "pruned": result.pruned,
                    "positions": {str(p): o for p, o in sorted(result.positions.items())},
                    "differences": [
                        {
                            "connection_id": d.connection_id,
                            "live": d.live and state_json(d.live),
                            "replayed": d.replayed and state_json(d.replayed),
                        }
                        for d in result.differences[: ns.examples]
                    ],
                    "differing": len(result.differences),
                    "node_differences": [
                        {
                            "node_id": n.node_id,
                            "live": n.live and n.live._asdict(),
                            "replayed": n.replayed and n.replayed._asdict(),
                        }
                        for n in result.node_differences[: ns.examples]
                    ],
                    "label_index_differences": result.label_index_differences[: ns.examples],
                    "archived": result.archived,
                    "history_differences": result.history_differences[: ns.examples],
                },
                ensure_ascii=False,
            )
        )
        return cli.Exit.OK if result.ok else cli.Exit.NEGATIVE
    print(
        f"compared {result.compared} connections "
        f"({result.events} events, {result.invalid} invalid, "
        f"{result.pruned} pruned by retention, {result.archived} of them in the history) "
        f"up to stored positions {dict(sorted(result.positions.items()))}"
    )
    if result.ok:
        print("OK: the read model equals a fresh fold of the log")
        return cli.Exit.OK
    print(
        f"DIVERGED: {len(result.differences)} connections, "
        f"{len(result.node_differences)} gateway nodes and the label index of "
        f"{len(result.label_index_differences)} connections differ; "
        f"{len(result.history_differences)} differences in the history",
        file=sys.stderr,
    )
    for line in result.history_differences[: ns.examples]:
        print(json.dumps({"history": line}, ensure_ascii=False), file=sys.stderr)
    for cid in result.label_index_differences[: ns.examples]:
        print(json.dumps({"label_index_differs_for": cid}, ensure_ascii=False), file=sys.stderr)
    for n in result.node_differences[: ns.examples]:
        print(
            json.dumps(
                {
                    "node_id": n.node_id,
                    "live": n.live and n.live._asdict(),
                    "replayed": n.replayed and n.replayed._asdict(),
                }
            ),
            file=sys.stderr,
        )
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
    return cli.Exit.NEGATIVE


def _progress(what: str, interval_s: float) -> Callable[[int, int], None]:
    """A line on stderr at most every interval_s while the log is read (0: none)."""
    started = last = time.monotonic()

    def show(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if interval_s <= 0 or (now - last < interval_s and done < total):
            return
        last = now
        pct = 100.0 * done / total if total else 100.0
        rate = done / max(now - started, 1e-9)
        print(
            f"{what}: {done:,}/{total:,} records ({pct:.1f}%), {rate:,.0f} records/s",
            file=sys.stderr,
            flush=True,
        )

    return show


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

        async with LogReader(
            KafkaConnection.from_settings(settings, "audit"), settings.events_topic
        ) as reader:
            rebuild = Rebuild(
                engine,
                reader,
                batch_events=settings.rebuild_batch_events,
                max_events_per_second=settings.rebuild_max_events_per_second,
                max_switch_gap=settings.rebuild_max_switch_gap,
                lock_timeout_seconds=settings.rebuild_lock_timeout_seconds,
                switch=not ns.no_switch,
                on_batch=show,
            )
            if await shadow_exists(engine):
                print("resuming the interrupted rebuild in the shadow tables", file=sys.stderr)
            try:
                result = await rebuild.run()
            except RebuildError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return cli.Exit.NEGATIVE
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
    prog = "conntrack-audit"
    sections = ("kafka", "database", "logging")
    parser = cli.parser(prog, __doc__, sections)
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("history", help="a connection's ordered event timeline")
    h.add_argument("connection_id")
    h.add_argument(
        "--format", choices=("table", "json", "jsonl"), default="table", help="jsonl: as json"
    )
    h.add_argument("--until", type=parse_time_ms, help="only what the log held before this time")
    a = sub.add_parser("as-of", help="reconstruct the read model as of a time")
    a.add_argument("time", type=parse_time_ms, help="RFC 3339 time or epoch milliseconds")
    a.add_argument("--output", help="SQLite file to create (default as-of-<ms>.db)")
    a.add_argument("--output-url", help="any SQLAlchemy async URL instead of --output")
    a.add_argument("--connection", help="print only this connection's state as JSON")
    a.add_argument(
        "--clock",
        choices=("log", "event"),
        default="log",
        help="log: what the log held at TIME (cut by its timestamps); event: every event that "
        "occurred by TIME, whenever it arrived (what the directory's answers in time give)",
    )
    v = sub.add_parser("verify", help="compare the live read model with a fresh fold")
    v.add_argument("--examples", type=int, default=10, help="differences to print")
    for p in (a, v):
        p.add_argument("--format", choices=("table", "json"), default="table")
        p.add_argument(
            "--progress-interval", type=float, default=2.0, help="seconds between lines; 0: none"
        )
    r = sub.add_parser(
        "rebuild", help="rebuild the live read model without downtime (docs/rebuild.md)"
    )
    r.add_argument("--progress-interval", type=float, default=2.0, help="seconds between lines")
    r.add_argument("--no-switch", action="store_true", help="stop once caught up; do not switch")
    r.add_argument(
        "--abandon", action="store_true", help="drop the shadow tables of an unfinished rebuild"
    )
    r.add_argument(
        "--drop-retired", action="store_true", help="drop the generation a switch retired"
    )
    for p in (h, a, v):
        cli.add_settings(p, sections)
    cli.add_settings(r, (*sections, "rebuild"))
    ns = parser.parse_args(argv)
    # Commands print their results; the log says only what went wrong.
    settings = cli.start(
        prog,
        ns,
        gen0_threshold=lambda s: gen0_threshold(s.rebuild_batch_events),
        log_level="WARNING",
    )
    handler = {
        "history": cmd_history,
        "as-of": cmd_as_of,
        "verify": cmd_verify,
        "rebuild": cmd_rebuild,
    }[ns.command]
    interrupted = "interrupted"
    if ns.command == "rebuild":
        interrupted = (
            "interrupted: the shadow tables keep every committed batch; run "
            "`conntrack-audit rebuild` again to resume (or --abandon)"
        )

    async def body() -> int:
        try:
            return await handler(settings, ns)
        except TopicNotFoundError as exc:
            raise cli.CommandError(
                f"{exc}; check CONNTRACK_EVENTS_TOPIC / --events-topic", cli.Exit.USAGE
            ) from None

    cli.run(prog, body, settings, interrupted)


if __name__ == "__main__":
    main()
