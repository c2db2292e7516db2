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
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.audit.log import LogReader
from conntrack.audit.replay import read_event_tuples
from conntrack.core.events import EventTuple, encode, record_key
from conntrack.core.fold import ConnectionState, fold_nodes, fold_tuples
from conntrack.core.history import open_at, replay_at
from conntrack.core.labels import from_json
from conntrack.core.liveness import Liveness
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2 as pb
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2_grpc as pb_grpc
from conntrack.core.schema import LIVE
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.core.timeutil import to_ns, to_timestamp
from conntrack.projector.runner import Projector
from tests.support.directory import channel_to, failure, serving
from tests.support.history import GATEWAY, HOUR, SECOND, simulate_day
from tests.support.kafka import publish
from tests.support.projector import running, wait_caught_up

pytestmark = [pytest.mark.kafka]

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
        present = Liveness(
            LIVENESS.node_lease_ns, LIVENESS.idle_timeout_ns, LIVENESS.max_lifetime_ns
        )
        now_bounds = present.bounds(fold_nodes(log), time.time_ns())
        mine: dict[str, list[ConnectionState]] = {}
        for s in final.values():
            if s.gateway_id == GATEWAY and s.principal and s.connected_at_ns is not None:
                mine.setdefault(s.principal, []).append(s)
        for principal in day.principals:
            theirs = mine.get(principal, [])
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
            live_now = [
                s
                for s in theirs
                if s.is_open
                and now_bounds.gone(
                    node_id=s.node_id,
                    node_incarnation=s.node_incarnation,
                    connected_at_ns=s.connected_at_ns or 0,
                    last_active_at_ns=s.last_active_at_ns or 0,
                )
                is None
            ]
            assert seen.connected_now == bool(live_now)
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
