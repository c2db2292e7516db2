"""Presence in time, on both read-model backends over the real broker: a day of traffic (nodes
dying, stalling, restarting and fenced) is projected and retention moves the older closed
connections into the history; then every answer in time the API gives equals a replay of the
log to that moment (core/history.py, replay_at): the connections open at 200 random moments
(listed page by page, and counted, also by node and label), connections as of a moment, and each
of 1,000 principals' last sighting and sessions over a window. A moment before the kept history
is FAILED_PRECONDITION naming the oldest one kept; one in the future INVALID_ARGUMENT."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.audit.log import LogReader
from conntrack.audit.replay import fold_by_event_time, read_event_tuples, verify
from conntrack.core.events import EventTuple, encode, record_key
from conntrack.core.fold import ConnectionState, fold_nodes, fold_tuples
from conntrack.core.history import bucket_of, buckets_of, open_at, replay_at
from conntrack.core.history_store import expire
from conntrack.core.labels import from_json
from conntrack.core.liveness import Liveness
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2 as pb
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2_grpc as pb_grpc
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.schema import LIVE
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.core.timeutil import to_ns, to_timestamp
from conntrack.projector.runner import Projector
from tests.support.directory import channel_to, failure, serving
from tests.support.history import GATEWAY, HOUR, SECOND, simulate_day
from tests.support.kafka import publish
from tests.support.projector import running, wait_caught_up
from tests.support.readmodel import ReadModel, closed, opened

PARTITIONS = (
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = 'connection_history'::regclass"
)

LEASE_S = 150
LIVENESS = Liveness.of_seconds(LEASE_S, idle=600, lifetime=5 * 3600)


async def list_at(
    stub: pb_grpc.ConnectionDirectoryServiceStub, at: int, size: int = 40, **filters: Any
) -> list[str]:
    out: list[str] = []
    token = ""
    while True:
        page = await stub.ListConnections(
            pb.ListConnectionsRequest(
                gateway_id=GATEWAY,
                page_size=size,
                page_token=token,
                filter=pb.ConnectionFilter(**filters),
                as_of=to_timestamp(at),
            ),
            timeout=30,
        )
        out.extend(e.connection.id for e in page.connections)
        if not page.next_page_token:
            return out
        token = page.next_page_token


async def count_at(stub: pb_grpc.ConnectionDirectoryServiceStub, at: int, **filters: Any) -> int:
    answer = await stub.CountConnections(
        pb.CountConnectionsRequest(
            gateway_id=GATEWAY, filter=pb.ConnectionFilter(**filters), as_of=to_timestamp(at)
        ),
        timeout=30,
    )
    return int(answer.count)


def of_gateway(states: dict[str, ConnectionState]) -> list[str]:
    return sorted(cid for cid, s in states.items() if s.gateway_id == GATEWAY)


async def sessions_of(
    stub: pb_grpc.ConnectionDirectoryServiceStub, principal: str, start: int, end: int
) -> list[pb.Session]:
    out: list[pb.Session] = []
    token = ""
    while True:
        page = await stub.ListSessions(
            pb.ListSessionsRequest(
                gateway_id=GATEWAY,
                principal=principal,
                window_start=to_timestamp(start),
                window_end=to_timestamp(end),
                page_size=3,
                page_token=token,
            ),
            timeout=30,
        )
        out.extend(page.sessions)
        if not page.next_page_token:
            return out
        token = page.next_page_token


def expected_state(states: dict[str, ConnectionState], live: Any, cid: str) -> tuple[str, str]:
    s = states.get(cid)
    if s is None or s.connected_at_ns is None:
        return "NOT_FOUND", ""
    if s.disconnected_at_ns is not None:
        return "CLOSED", ""
    gone = live.gone(
        node_id=s.node_id,
        node_incarnation=s.node_incarnation,
        connected_at_ns=s.connected_at_ns,
        last_active_at_ns=s.last_active_at_ns or s.connected_at_ns,
    )
    return ("OPEN", "") if gone is None else ("GONE", gone)


@pytest.mark.kafka
async def test_every_answer_in_time_equals_a_replay_of_the_log(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    rnd = random.Random(28)
    now = time.time_ns()
    day = simulate_day(rnd, now - 5 * SECOND, lease_ns=LEASE_S * SECOND)
    await publish(
        kafka_settings.kafka_bootstrap_servers,
        kafka_settings.events_topic,
        [(record_key(e), encode(e), []) for e in day.events],
    )
    settings = kafka_settings.model_copy(
        update={
            "node_lease_seconds": LEASE_S,
            "retention_disconnected_seconds": 3 * 3600,
            "history_days": 7,
        }
    )
    store = ProjectionStore(engine)
    async with running(Projector(settings, store)) as projector:
        await wait_caught_up(store, settings, within=120)
        pruned = await projector.prune_once()
    async with engine.connect() as conn:
        archived = (
            await conn.execute(select(func.count()).select_from(LIVE.connection_history))
        ).scalar_one()
    assert pruned > 300  # both tables answer
    assert archived >= pruned

    # The oracle: the log, read back from the broker.
    async with LogReader(settings.kafka_bootstrap_servers, settings.events_topic) as reader:
        log: Sequence[EventTuple] = await read_event_tuples(reader)
    assert len(log) == len(day.events)

    async with (
        serving(engine, liveness=LIVENESS, history_days=7) as server,
        channel_to(server) as channel,
    ):
        stub = pb_grpc.ConnectionDirectoryServiceStub(channel)
        moments = sorted(day.start_ns - HOUR + rnd.randrange(25 * HOUR) for _ in range(200))
        moments = [min(m, now) for m in moments]
        nonempty = 0
        all_ids = sorted(fold_tuples(log))
        for i, at in enumerate(moments):
            states, live = replay_at(log, at, LIVENESS)
            expected = of_gateway(open_at(states, live))
            nonempty += bool(expected)
            assert await list_at(stub, at) == expected, at
            assert await count_at(stub, at) == len(expected), at
            if i % 10 == 0:  # the filters, on some of the moments
                node = f"node-{i % 4}"
                by_node = [c for c in expected if states[c].node_id == node]
                assert await list_at(stub, at, 7, node_id=node) == by_node
                gold = [c for c in expected if from_json(states[c].labels) == {"tier": "gold"}]
                assert await list_at(stub, at, 9, label_selector="tier=gold") == gold
                assert await count_at(stub, at, label_selector="tier=gold") == len(gold)
            # A few connections as of the moment: open, closed, gone or not yet connected.
            gone = [c for c, s in states.items() if s.is_open and c not in expected]
            picks = rnd.sample(all_ids, 2) + rnd.sample(expected, min(2, len(expected)))
            for cid in picks + rnd.sample(gone, min(2, len(gone))):
                want = expected_state(states, live, cid)
                try:
                    got = await stub.GetConnectionAsOf(
                        pb.GetConnectionAsOfRequest(connection_id=cid, as_of=to_timestamp(at)),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                else:
                    code = pb.ConnectionAsOf.State.Name(got.state)
                    assert got.gone_reason == want[1], (cid, at)
                assert code == want[0], (cid, at)
        assert nonempty > 150  # the moments were in the thick of it

        # Each principal's last sighting and its sessions over a window, against the log's.
        final = fold_tuples(log)
        nodes_now = fold_nodes(log)

        def live_now(theirs: list[ConnectionState], at: int) -> bool:
            bounds = LIVENESS.bounds(nodes_now, at)
            return any(
                s.is_open
                and bounds.gone(
                    node_id=s.node_id,
                    node_incarnation=s.node_incarnation,
                    connected_at_ns=s.connected_at_ns or 0,
                    last_active_at_ns=s.last_active_at_ns or 0,
                )
                is None
                for s in theirs
            )

        mine: dict[str, list[ConnectionState]] = {}
        for s in final.values():
            if s.gateway_id == GATEWAY and s.principal and s.connected_at_ns is not None:
                mine.setdefault(s.principal, []).append(s)
        connected_now = 0
        for principal in day.principals:
            theirs = mine.get(principal, [])
            asked = time.time_ns()
            seen = await stub.GetLastSeen(
                pb.GetLastSeenRequest(gateway_id=GATEWAY, principal=principal), timeout=10
            )
            # The latest activity; of equal ones, the least id.
            best = min(
                ((-(s.last_active_at_ns or 0), s.connection_id) for s in theirs), default=None
            )
            if best is None:
                assert not seen.HasField("last_seen")
            else:
                assert (to_ns(seen.last_seen), seen.connection_id) == (-best[0], best[1])
            # The present's rules move with the clock (the idle rule above all): judged at the
            # moments before and after the call, and compared when the two agree.
            judged = {live_now(theirs, t) for t in (asked, time.time_ns())}
            if len(judged) == 1:
                assert seen.connected_now == judged.pop()
                connected_now += seen.connected_now
            start = day.start_ns + rnd.randrange(20 * HOUR)
            end = start + rnd.randrange(1, 4 * HOUR)
            window = sorted(
                (
                    s
                    for s in theirs
                    if s.connected_at_ns is not None
                    and s.connected_at_ns < end
                    and (s.disconnected_at_ns is None or s.disconnected_at_ns >= start)
                ),
                key=lambda s: (s.connected_at_ns, s.connection_id),
            )
            got = await sessions_of(stub, principal, start, end)
            assert [g.entry.connection.id for g in got] == [s.connection_id for s in window]
            for g, s in zip(got, window, strict=True):
                closed_at = to_ns(g.disconnected_at) if g.HasField("disconnected_at") else None
                assert closed_at == s.disconnected_at_ns
                assert g.status_code == (s.disconnect_status_code or 0)

        assert connected_now > 20

        # Outside the kept history, and in the future.
        week_ago = time.time_ns() - 8 * 24 * HOUR
        err = await failure(list_at(stub, week_ago))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "before the oldest moment kept" in (err.details() or "")
        assert "conntrack-audit as-of" in (err.details() or "")
        err = await failure(count_at(stub, time.time_ns() + 3600 * SECOND))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = await failure(list_at(stub, now - HOUR, last_active_before=to_timestamp(now)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The ends of Timestamp's range: refused or answered, never an internal error.
        first, last = to_ns(Timestamp(seconds=-62135596800)), to_ns(Timestamp(seconds=253402300799))
        err = await failure(count_at(stub, first))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        someone = day.principals[0]
        until_last = await sessions_of(stub, someone, now - HOUR, last)
        until_now = await sessions_of(stub, someone, now - HOUR, time.time_ns())
        assert [s.entry.connection.id for s in until_last] == [
            s.entry.connection.id for s in until_now
        ]
        err = await failure(sessions_of(stub, someone, now - HOUR, first))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    # `conntrack-audit verify` checks the history too, and notices a row that is not the log's;
    # `conntrack-audit as-of --clock event` folds what the answers in time are compared with.
    async with LogReader(settings.kafka_bootstrap_servers, settings.events_topic) as reader:
        middle = day.start_ns + 12 * HOUR
        by_event = await fold_by_event_time(reader, middle)
        assert by_event.states == replay_at(log, middle, LIVENESS)[0]
        verified = await verify(engine, reader)
        assert verified.ok, verified.history_differences[:3]
        assert verified.archived == pruned
        h = LIVE.connection_history
        async with engine.begin() as conn:
            victim = (await conn.execute(select(h.c.connection_id).limit(1))).scalar_one()
            await conn.execute(
                update(h)
                .where(h.c.connection_id == victim)
                .values(disconnected_at_ns=h.c.disconnected_at_ns + 1)
            )
        verified = await verify(engine, reader)
        assert not verified.ok
        assert verified.history_differences == [
            f"connection {victim}: its history rows differ from the log's state"
        ]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_the_history_expires_by_the_day_without_holding_up_gets(
    engine: AsyncEngine,
) -> None:
    """Closed connections of ten past days move into the history; expiring it to a week drops
    the three oldest days (whole partitions on PostgreSQL) and nothing else, and a Get is
    answered while a partition's drop holds its locks."""
    model = ReadModel(engine)
    now = time.time_ns()
    day = 24 * HOUR
    states = [
        opened(f"d{d}-{i}", GATEWAY, now - d * day - 2 * HOUR + i * SECOND)
        for d in range(10)
        for i in range(20)
    ]
    await model.apply([closed(st, (st.connected_at_ns or 0) + 90 * 60 * SECOND) for st in states])
    await model.apply([opened("still-open", GATEWAY, now - 9 * day)])
    while (await model.store.prune(now, None, keep_history=True)).pruned:
        pass
    horizon = now - 7 * day
    h = LIVE.connection_history

    async def kept() -> set[str]:
        async with engine.connect() as conn:
            return set((await conn.execute(select(h.c.connection_id))).scalars())

    before = await kept()
    assert len(before) == len(states)
    expired = await expire(engine, LIVE, horizon, LEASE_S * SECOND)
    after = await kept()
    # The hours before the horizon's (whole days before its day on PostgreSQL) are gone: a
    # connection stays while any of its hours does, so one open at the horizon always stays.
    postgres = engine.dialect.name == "postgresql"
    cutoff = (horizon // day) * 24 if postgres else bucket_of(horizon)
    starts = {st.connection_id: st.connected_at_ns or 0 for st in states}
    ends = {c: start + 90 * 60 * SECOND for c, start in starts.items()}
    assert after == {c for c in starts if buckets_of(starts[c], ends[c])[-1] >= cutoff}
    assert all(c in after for c, end in ends.items() if end >= horizon)
    assert len(before - after) >= 40  # the eighth and ninth days ago at least
    if engine.dialect.name == "postgresql":
        assert expired.partitions >= 2
        assert expired.rows >= 2 * len(before - after)  # each held two or three hours
        # A drop holds its locks until it commits: a Get is answered meanwhile.
        async with engine.connect() as conn:
            names = sorted((await conn.execute(text(PARTITIONS))).scalars())
        async with serving(engine) as server, channel_to(server) as channel:
            stub = svc_grpc.ConnectionServiceStub(channel)
            async with engine.connect() as conn, conn.begin():
                await conn.execute(text(f'DROP TABLE "{names[0]}"'))
                found = await stub.Get(
                    svc.GetConnectionRequest(connection_id="still-open"), timeout=5
                )
                assert found.id == "still-open"
