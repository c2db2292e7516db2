"""No ghost connections: a connection whose gateway node started again, or has not been heard
from for longer than the lease, is gone for Get, and a silent node heard from again brings its
connections back (the judgment is made at read time). The read model stays the fold of the log:
verify agrees. On the real broker, once per read-model backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.read.repository import ConnectionRepository
from conntrack.api.transport.server import ApiServer
from conntrack.audit.log import LogReader
from conntrack.audit.replay import verify
from conntrack.core.events import (
    Activity,
    Connected,
    Event,
    NodeHeartbeat,
    NodeStarted,
    encode,
    record_key,
)
from conntrack.core.liveness import Liveness
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.projector.runner import Projector
from tests.support.kafka import publish
from tests.support.projector import running, wait_caught_up

pytestmark = [pytest.mark.kafka]

SECOND = 1_000_000_000


async def emit(settings: Settings, events: Sequence[Event]) -> None:
    await publish(
        settings.kafka_bootstrap_servers,
        settings.events_topic,
        [(record_key(e), encode(e), []) for e in events],
    )


async def code_of(stub: svc_grpc.ConnectionServiceStub, connection_id: str) -> tuple[str, str]:
    try:
        await stub.Get(svc.GetConnectionRequest(connection_id=connection_id), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


async def test_connections_of_a_restarted_or_silent_node_are_gone_until_it_is_heard_from(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    s = kafka_settings
    now = time.time_ns()
    lease = 30 * SECOND  # node b, last heard 60 s ago, is past it; the rest well inside it
    n = 0

    def event(cid: str, payload: object, at: int) -> Event:
        nonlocal n
        n += 1
        return Event(f"e{n}", cid, "gw", at, payload)  # type: ignore[arg-type]

    await emit(
        s,
        [
            # Node a, incarnation 1: alive (heard from just now), then started again below.
            event("", NodeStarted("a", 1), now - 60 * SECOND),
            event("a-1", Connected("10.0.0.1", "ua", "a", 1), now - 50 * SECOND),
            event("", NodeHeartbeat("a", 1), now),
            # Node b: last heard from a minute ago, longer than the lease.
            event("", NodeStarted("b", 7), now - 70 * SECOND),
            event("b-1", Connected("10.0.0.2", "ua", "b", 7), now - 65 * SECOND),
            event("", NodeHeartbeat("b", 7), now - 60 * SECOND),
            # A gateway without the node role: never judged by a node.
            event("plain", Connected("10.0.0.3", "ua"), now - 60 * SECOND),
            # Idle for an hour, on a live node.
            event("", NodeStarted("c", 1), now - 7200 * SECOND),
            event("idle", Connected("10.0.0.4", "ua", "c", 1), now - 7200 * SECOND),
            event("", NodeHeartbeat("c", 1), now),
        ],
    )
    liveness = Liveness(node_lease_ns=lease, idle_timeout_ns=1800 * SECOND)
    store = ProjectionStore(engine)
    async with (
        running(Projector(s, store)),
        ApiServer(
            ConnectionRepository(engine),
            "127.0.0.1:0",
            freshness_ttl_seconds=0,
            liveness=liveness,
        ) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = svc_grpc.ConnectionServiceStub(channel)
        await wait_caught_up(store, s)
        assert await code_of(stub, "a-1") == ("OK", "")
        assert await code_of(stub, "plain") == ("OK", "")
        assert await code_of(stub, "b-1") == (
            "NOT_FOUND",
            "connection 'b-1' not found (gone: node lost)",
        )
        assert (await code_of(stub, "idle"))[1].endswith("(gone: idle)")

        # Node a starts again: its old connection is gone. Node b is heard from again: its
        # connection is back (nothing about it was written as history).
        await emit(
            s,
            [
                event("", NodeStarted("a", 2), time.time_ns()),
                event("", NodeHeartbeat("b", 7), time.time_ns()),
                event("a-2", Connected("10.0.0.5", "ua", "a", 2), time.time_ns()),
                event("idle", Activity(1), time.time_ns()),
            ],
        )
        await wait_caught_up(store, s)
        assert (await code_of(stub, "a-1"))[1].endswith("(gone: node restarted)")
        assert await code_of(stub, "a-2") == ("OK", "")
        assert await code_of(stub, "b-1") == ("OK", "")
        assert await code_of(stub, "idle") == ("OK", "")

    nodes = await store.nodes()
    assert {k: (v.incarnation, v.started_at_ns is not None) for k, v in nodes.items()} == {
        "a": (2, True),
        "b": (7, True),
        "c": (1, True),
    }
    async with LogReader(s.kafka_bootstrap_servers, s.events_topic) as reader:
        result = await verify(engine, reader)
    assert result.ok, (result.differences, result.node_differences)


async def test_a_lease_of_zero_never_judges_a_silent_node(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    s = kafka_settings
    now = time.time_ns()
    await emit(
        s,
        [
            Event("s", "", "gw", now - 3600 * SECOND, NodeStarted("z", 3)),
            Event("c", "z-1", "gw", now - 3600 * SECOND, Connected("10.0.0.9", "ua", "z", 3)),
        ],
    )
    store = ProjectionStore(engine)
    async with (
        running(Projector(s, store)),
        ApiServer(
            ConnectionRepository(engine), "127.0.0.1:0", liveness=Liveness(node_lease_ns=0)
        ) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await wait_caught_up(store, s)
        await asyncio.sleep(0)
        assert await code_of(svc_grpc.ConnectionServiceStub(channel), "z-1") == ("OK", "")
