"""Folding history afresh: the whole log, a cut of it at a moment, or one connection's events.

Everything here is read-only towards the live system: it reads the log outside any consumer
group and reads the live read model in one snapshot."""

from __future__ import annotations

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
from conntrack.core.schema import (
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

    def add(self, event: Event) -> None:
        if event.connection_id:
            self.states[event.connection_id] = apply(self.states.get(event.connection_id), event)
        else:  # a node's own event
            for node_id, node in fold_nodes([_tuple(event)]).items():
                old = self.nodes.get(node_id)
                self.nodes[node_id] = node if old is None else merge_nodes(old, node)
        self.events += 1


# on_progress(records read, records to read): called after every batch read from the log.
OnProgress = Callable[[int, int], None]


async def fold_log(
    reader: LogReader, bounds: Bounds, on_progress: OnProgress | None = None
) -> Replay:
    replay = Replay(bounds=dict(bounds))
    total = sum(max(0, end - start) for start, end in bounds.values())
    done = 0
    async for batch in reader.read(bounds):
        for record in batch:
            try:
                replay.add(decode_record(record.value, record.key))
            except InvalidEvent:
                replay.invalid += 1  # the projector dead-letters these; they fold to nothing
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
            try:
                out.append(decode_record_tuple(record.value, record.key))
            except InvalidEvent:
                pass
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
    return Snapshot(states, positions, pruned, nodes, label_rows)


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

    @property
    def ok(self) -> bool:
        return not (self.differences or self.node_differences or self.label_index_differences)


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
    )
