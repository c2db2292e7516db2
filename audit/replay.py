"""Folding history afresh: the whole log, a cut of it at a moment, or one connection's events.

Everything here is read-only towards the live system: it reads the log outside any consumer
group and reads the live read model in one snapshot."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.audit.log import Bounds, LogReader, partition_for_key
from conntrack.core.events import (
    Event,
    EventTuple,
    InvalidEvent,
    decode_record,
    decode_record_tuple,
)
from conntrack.core.fold import (
    ConnectionState,
    NodeState,
    apply,
    fold_nodes,
    merge_nodes,
)
from conntrack.core.history import (
    SIGHTING_GAP_NS,
    Sighting,
    buckets_of,
    coalesce,
    fences_of,
    sightings_of,
)
from conntrack.core.schema import (
    LIVE,
    LabelRow,
    connection_labels,
    connections,
    label_rows_of,
    projection_offsets,
    pruned_connections,
    row_to_node,
    row_to_state,
)
from conntrack.core.schema import nodes as nodes_table


def _tuple(event: Event) -> EventTuple:
    return (
        event.event_id,
        event.connection_id,
        event.gateway_id,
        event.occurred_at_ns,
        event.payload,
    )


@dataclass
class Replay:
    """The result of folding a bounded part of the log."""

    states: dict[str, ConnectionState] = field(default_factory=dict)
    bounds: dict[int, tuple[int, int]] = field(default_factory=dict)
    events: int = 0
    invalid: int = 0
    nodes: dict[str, NodeState] = field(default_factory=dict)
    node_events: list[EventTuple] = field(default_factory=list)  # for the nodes' history

    def add(self, event: Event) -> None:
        if event.connection_id:
            self.states[event.connection_id] = apply(self.states.get(event.connection_id), event)
        else:  # a node's own event
            self.node_events.append(_tuple(event))
            for node_id, node in fold_nodes([_tuple(event)]).items():
                old = self.nodes.get(node_id)
                self.nodes[node_id] = node if old is None else merge_nodes(old, node)
        self.events += 1


# on_progress(records read, records to read): called after every batch read from the log.
OnProgress = Callable[[int, int], None]


async def fold_log(
    reader: LogReader,
    bounds: Bounds,
    on_progress: OnProgress | None = None,
    keep: Callable[[Event], bool] | None = None,
) -> Replay:
    """Fold the records within bounds (only the events `keep` accepts, if given)."""
    replay = Replay(bounds=dict(bounds))
    total = sum(max(0, end - start) for start, end in bounds.values())
    done = 0
    async for batch in reader.read(bounds):
        for record in batch:
            try:
                event = decode_record(record.value, record.key)
            except InvalidEvent:
                replay.invalid += 1  # the projector dead-letters these; they fold to nothing
                continue
            if keep is None or keep(event):
                replay.add(event)
        done += len(batch)
        if on_progress is not None:
            on_progress(done, total)
    return replay


async def fold_until(
    reader: LogReader, timestamp_ms: int, on_progress: OnProgress | None = None
) -> Replay:
    """The read model as the system knew it at timestamp_ms: each partition cut at the first
    record the log stamped at or after that moment."""
    parts = await reader.partitions()
    start, cut = await reader.beginning(parts), await reader.offsets_at(parts, timestamp_ms)
    bounds = {p: (start[p], max(start[p], cut[p])) for p in parts}
    return await fold_log(reader, bounds, on_progress)


async def fold_by_event_time(
    reader: LogReader, at_ns: int, on_progress: OnProgress | None = None
) -> Replay:
    """The read model as of at_ns by the events' own times: the fold of every event of the
    whole log that occurred at or before at_ns, whenever the log received it. What the
    directory's answers in time give (docs/history.md), where fold_until() cuts the log by its
    own timestamps."""
    bounds = await reader.full_bounds()
    return await fold_log(reader, bounds, on_progress, lambda e: e.occurred_at_ns <= at_ns)


async def read_event_tuples(
    reader: LogReader, on_progress: OnProgress | None = None
) -> list[EventTuple]:
    """Every event of the whole log, as the fold takes them (records that do not decode are
    left out: they fold to nothing). For answers about moments by the events' own times
    (core/history.py, replay_at), where a cut of the log by its timestamps would not do."""
    bounds = await reader.full_bounds()
    total = sum(max(0, end - start) for start, end in bounds.values())
    out: list[EventTuple] = []
    async for batch in reader.read(bounds):
        for record in batch:
            with contextlib.suppress(InvalidEvent):  # folds to nothing
                out.append(decode_record_tuple(record.value, record.key))
        if on_progress is not None:
            on_progress(len(out), total)
    return out


@dataclass(frozen=True)
class HistoryEntry:
    partition: int
    offset: int
    log_timestamp_ms: int
    event: Event | None
    error: str | None = None


async def history(
    reader: LogReader, connection_id: str, *, until_ms: int | None = None
) -> AsyncIterator[HistoryEntry]:
    """Every record keyed by connection_id, in log order, reading only the partition the key
    maps to (and, with until_ms, only what the log held before that moment)."""
    key = connection_id.encode()
    parts = await reader.partitions()
    p = partition_for_key(key, len(parts))
    ((start, end),) = (await reader.full_bounds([p])).values()
    if until_ms is not None:
        end = max(start, (await reader.offsets_at([p], until_ms))[p])
    async for batch in reader.read({p: (start, end)}):
        for r in batch:
            if r.key != key:
                continue
            try:
                yield HistoryEntry(
                    r.partition, r.offset, r.timestamp, decode_record(r.value, r.key)
                )
            except InvalidEvent as exc:
                yield HistoryEntry(r.partition, r.offset, r.timestamp, None, str(exc))


async def state_of(
    reader: LogReader, connection_id: str, *, until_ms: int | None = None
) -> ConnectionState | None:
    state: ConnectionState | None = None
    async for entry in history(reader, connection_id, until_ms=until_ms):
        if entry.event is not None:
            state = apply(state, entry.event)
    return state


@dataclass(frozen=True)
class Snapshot:
    states: dict[str, ConnectionState]
    positions: dict[int, int]
    pruned: set[str]  # connections retention deleted (their tombstones)
    nodes: dict[str, NodeState]
    label_rows: set[LabelRow]
    # The history (core/history_store.py): connection id -> its rows' (bucket, final) and state.
    history: dict[str, tuple[list[tuple[int, int]], ConnectionState]]
    sightings: set[Sighting]
    fences: dict[tuple[str, int], int]


async def snapshot(engine: AsyncEngine, topic: str) -> Snapshot:
    """The live read model's rows, tombstones and stored positions, read in one transaction so
    they agree even while the projector keeps writing (SQLite WAL and PostgreSQL REPEATABLE
    READ give a consistent snapshot)."""
    options = {} if engine.dialect.name == "sqlite" else {"isolation_level": "REPEATABLE READ"}
    async with engine.connect() as conn:
        conn = await conn.execution_options(**options)
        async with conn.begin():
            rows = await conn.execute(
                select(projection_offsets).where(projection_offsets.c.topic == topic)
            )
            positions = {int(r.partition): int(r.next_offset) for r in rows}
            states = {
                r["connection_id"]: row_to_state(r)
                for r in (await conn.execute(select(connections))).mappings()
            }
            pruned = set((await conn.execute(select(pruned_connections.c.connection_id))).scalars())
            nodes = {
                r["node_id"]: row_to_node(r)
                for r in (await conn.execute(select(nodes_table))).mappings()
            }
            label_rows: set[LabelRow] = {
                (r.connection_id, r.key, r.value, r.gateway_id)
                for r in await conn.execute(select(connection_labels))
            }
            history: dict[str, tuple[list[tuple[int, int]], ConnectionState]] = {}
            h = LIVE.connection_history
            for r in (await conn.execute(select(h).order_by(h.c.bucket))).mappings():
                hours, _ = history.setdefault(r["connection_id"], ([], row_to_state(r)))
                hours.append((int(r["bucket"]), int(r["final"])))
                if row_to_state(r) != history[r["connection_id"]][1]:
                    hours.append((int(r["bucket"]), -1))  # rows of one connection disagree
            s = LIVE.node_sightings.c
            sightings = {
                Sighting(r.node_id, int(r.incarnation), int(r.first_seen_ns), int(r.last_seen_ns))
                for r in await conn.execute(
                    select(s.node_id, s.incarnation, s.first_seen_ns, s.last_seen_ns)
                )
            }
            f = LIVE.node_fences.c
            fences = {
                (r.node_id, int(r.incarnation)): int(r.fenced_at_ns)
                for r in await conn.execute(select(f.node_id, f.incarnation, f.fenced_at_ns))
            }
    return Snapshot(states, positions, pruned, nodes, label_rows, history, sightings, fences)


@dataclass(frozen=True)
class Difference:
    connection_id: str
    live: ConnectionState | None
    replayed: ConnectionState | None


@dataclass(frozen=True)
class NodeDifference:
    node_id: str
    live: NodeState | None
    replayed: NodeState | None


@dataclass
class Verification:
    compared: int
    differences: list[Difference]
    node_differences: list[NodeDifference]
    positions: dict[int, int]
    events: int
    invalid: int
    pruned: int  # connections absent live because retention pruned them (tombstoned)
    # Connections whose rows in the label index are not exactly the labels of their replayed
    # state (core/schema.py, label_rows_of).
    label_index_differences: list[str] = field(default_factory=list)
    # What the history holds that the log does not say (one line each).
    history_differences: list[str] = field(default_factory=list)
    archived: int = 0  # connections in the history

    @property
    def ok(self) -> bool:
        return not (
            self.differences
            or self.node_differences
            or self.label_index_differences
            or self.history_differences
        )


async def verify(
    engine: AsyncEngine, reader: LogReader, on_progress: OnProgress | None = None
) -> Verification:
    """Fold history afresh up to the positions the live read model claims, and compare. A
    connection that retention pruned (it has a tombstone) is expected to be absent live and is
    counted, not reported."""
    snap = await snapshot(engine, reader.topic)
    live = snap.states
    parts = await reader.partitions()
    start = await reader.beginning(parts)
    bounds = {p: (start[p], max(start[p], snap.positions.get(p, start[p]))) for p in parts}
    replay = await fold_log(reader, bounds, on_progress)
    pruned = {cid for cid in snap.pruned if cid not in live and cid in replay.states}
    ids = (live.keys() | replay.states.keys()) - pruned
    diffs = [
        Difference(cid, live.get(cid), replay.states.get(cid))
        for cid in sorted(ids)
        if live.get(cid) != replay.states.get(cid)
    ]
    node_diffs = [
        NodeDifference(n, snap.nodes.get(n), replay.nodes.get(n))
        for n in sorted(snap.nodes.keys() | replay.nodes.keys())
        if snap.nodes.get(n) != replay.nodes.get(n)
    ]
    expected = label_rows_of(replay.states[cid] for cid in ids if cid in replay.states)
    label_diffs = sorted({row[0] for row in expected ^ snap.label_rows})
    return Verification(
        len(ids),
        diffs,
        node_diffs,
        snap.positions,
        replay.events,
        replay.invalid,
        len(pruned),
        label_diffs,
        history_differences(snap, replay),
        len(snap.history),
    )


def history_differences(snap: Snapshot, replay: Replay) -> list[str]:
    """The history against the log: each archived connection's rows hold its replayed state
    (it was pruned: no longer live), one row for each of the last hours its
    interval touches (retention expires the earliest hours first), the last marked final; each
    sighting interval is one the log's node events make (expiry only removes whole ones); the
    fences are exactly the log's."""
    out: list[str] = []
    for cid, (hours, stored) in sorted(snap.history.items()):
        state = replay.states.get(cid)
        if state is None or stored != state:
            out.append(f"connection {cid}: its history rows differ from the log's state")
            continue
        if cid in snap.states:
            out.append(f"connection {cid}: both live and in the history")
            continue
        assert state.connected_at_ns is not None
        assert state.disconnected_at_ns is not None
        want = list(buckets_of(state.connected_at_ns, state.disconnected_at_ns))
        buckets = [b for b, _ in hours]
        if buckets != want[len(want) - len(buckets) :] or [f for _, f in hours] != [0] * (
            len(hours) - 1
        ) + [1]:
            out.append(f"connection {cid}: its history rows are not the hours it was open")
    made: set[Sighting] = set()
    for new in sightings_of(replay.node_events, SIGHTING_GAP_NS):
        joined, hull = coalesce(made, new, SIGHTING_GAP_NS)
        made = (made - set(joined)) | {hull}
    out += [
        f"node {s.node_id}: sighting interval {tuple(s)} is not the log's"
        for s in sorted(snap.sightings - made)
    ]
    if snap.fences != fences_of(replay.node_events):
        out.append("node fences differ from the log's NodeFenced events")
    return out
