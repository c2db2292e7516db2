"""Send and Disconnect addressed to people (SendToConnections, DisconnectConnections) on the real
broker, three reference gateway nodes and real WebSocket clients, on both read-model backends:
each target's socket is acted on once and answered with its own outcome; except ids are left
alone; ids that are not open are GONE; a node SIGKILLed mid-operation leaves its targets
NODE_UNREACHABLE (and, after the lease, NODE_LOST), never DONE."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection, connect

from conntrack.api.application import targets
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2 as pb
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2_grpc as pb_grpc
from conntrack.core.settings import Settings
from tests.support.gateway import (
    header_identity_nodes,
    own_id,
    projector_and_api,
    with_command_topics,
)
from tests.support.readmodel import ReadModel, opened

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

Result = pb.TargetOutcome.Result


def outcomes(answer: pb.TargetedResponse) -> dict[str, str]:
    return {o.connection_id: Result.Name(o.result) for o in answer.outcomes}


async def received(client: ClientConnection, within: float = 20) -> str | bytes:
    return await asyncio.wait_for(client.recv(), within)


async def nothing_for(clients: list[ClientConnection], within: float = 1.0) -> None:
    """None of these clients receives anything within `within` seconds (waited for at once)."""
    got = await asyncio.gather(
        *(asyncio.wait_for(c.recv(), within) for c in clients), return_exceptions=True
    )
    assert all(isinstance(g, TimeoutError) for g in got), got


async def test_send_and_disconnect_by_principal_selector_and_ids_with_an_outcome_each(
    kafka_settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    rnd = random.Random(31)
    async with (
        with_command_topics(kafka_settings) as settings,
        projector_and_api(settings, engine, lease_seconds=3.0) as system,
        grpc.aio.insecure_channel(f"127.0.0.1:{system.server.port}") as channel,
        contextlib.AsyncExitStack() as stack,
    ):
        nodes = await header_identity_nodes(stack, settings, 3, tmp_path)
        people = ["alice", "bob", "carol", "dave"]
        clients: dict[str, ClientConnection] = {}
        owner: dict[str, str] = {}
        node_of: dict[str, int] = {}
        for i in range(36):
            who, at = people[i % 4], i % 3
            client = await stack.enter_async_context(
                connect(
                    nodes[at].url,
                    additional_headers={
                        "X-Authenticated-User": who,
                        "X-Tier": rnd.choice(["gold", "free"]),
                    },
                )
            )
            cid = own_id(client)
            clients[cid], owner[cid], node_of[cid] = client, who, at
        stub = pb_grpc.ConnectionDirectoryServiceStub(channel)
        gateway = settings.gateway_id
        for _ in range(300):
            count = await stub.CountConnections(pb.CountConnectionsRequest(gateway_id=gateway))
            if count.count == len(clients):
                break
            await asyncio.sleep(0.1)
        assert count.count == len(clients)

        def of(who: str) -> list[str]:
            return sorted(c for c in clients if owner[c] == who)

        # Send to a principal: each of alice's sockets gets the frame once, DONE each.
        answer = await stub.SendToConnections(
            pb.SendToConnectionsRequest(
                gateway_id=gateway,
                targets=pb.Targets(filter=pb.ConnectionFilter(principal="alice")),
                data=b"hello alice",
                type=pb.BroadcastRequest.TEXT,
            ),
            timeout=30,
        )
        assert outcomes(answer) == dict.fromkeys(of("alice"), "DONE")
        assert (answer.done, answer.gone, answer.node_unreachable) == (len(of("alice")), 0, 0)
        assert [o.connection_id for o in answer.outcomes] == of("alice")
        for cid in of("alice"):
            assert await received(clients[cid]) == "hello alice"
        await nothing_for([clients[c] for c in clients])

        # A label selector, and a principal and selector together.
        gold_bob = pb.ConnectionFilter(principal="bob", label_selector="tier=gold")
        answer = await stub.SendToConnections(
            pb.SendToConnectionsRequest(
                gateway_id=gateway,
                targets=pb.Targets(filter=gold_bob),
                data=b"\x00\x01",
                type=pb.BroadcastRequest.BINARY,
            ),
            timeout=30,
        )
        listed = await stub.ListConnections(
            pb.ListConnectionsRequest(gateway_id=gateway, filter=gold_bob)
        )
        assert sorted(outcomes(answer)) == sorted(e.connection.id for e in listed.connections)
        for cid in outcomes(answer):
            assert await received(clients[cid]) == b"\x00\x01"

        # Broadcast takes the same filters: a selector's sockets get the frame once, no others.
        gold = sorted(
            e.connection.id
            for e in (
                await stub.ListConnections(
                    pb.ListConnectionsRequest(
                        gateway_id=gateway,
                        page_size=100,
                        filter=pb.ConnectionFilter(label_selector="tier=gold"),
                    )
                )
            ).connections
        )
        assert gold
        sent = await stub.Broadcast(
            pb.BroadcastRequest(
                gateway_id=gateway,
                filter=pb.ConnectionFilter(label_selector="tier=gold"),
                data=b"gold only",
                type=pb.BroadcastRequest.TEXT,
            ),
            timeout=30,
        )
        assert (sent.addressed, sent.delivered, sent.complete) == (len(gold), len(gold), True)
        for cid in gold:
            assert await received(clients[cid]) == "gold only"
        await nothing_for([clients[c] for c in clients if c not in gold], within=0.5)

        # Log bob out everywhere but here.
        here, *elsewhere = of("bob")
        answer = await stub.DisconnectConnections(
            pb.DisconnectConnectionsRequest(
                gateway_id=gateway,
                targets=pb.Targets(
                    filter=pb.ConnectionFilter(principal="bob"), except_connection_ids=[here]
                ),
                status_code=4001,
                reason="signed out elsewhere",
            ),
            timeout=30,
        )
        assert outcomes(answer) == dict.fromkeys(elsewhere, "DONE")
        for cid in elsewhere:
            await asyncio.wait_for(clients[cid].wait_closed(), 20)
            assert (clients[cid].close_code, clients[cid].close_reason) == (
                4001,
                "signed out elsewhere",
            )
        await clients[here].send("still here")  # the excepted socket stays open

        # Listed ids: an unknown one and a closed one are GONE; the others DONE.
        carol = of("carol")
        answer = await stub.SendToConnections(
            pb.SendToConnectionsRequest(
                gateway_id=gateway,
                targets=pb.Targets(connection_ids=[*carol, "no-such-id", elsewhere[0]]),
                data=b"listed",
                type=pb.BroadcastRequest.TEXT,
            ),
            timeout=30,
        )
        assert outcomes(answer) == dict.fromkeys(carol, "DONE") | {
            "no-such-id": "GONE",
            elsewhere[0]: "GONE",
        }
        for cid in carol:
            assert await received(clients[cid]) == "listed"

        # A node SIGKILLed: its targets are NODE_UNREACHABLE, never DONE; the others DONE.
        await nodes[0].kill()
        dave = of("dave")
        answer = await stub.SendToConnections(
            pb.SendToConnectionsRequest(
                gateway_id=gateway,
                targets=pb.Targets(filter=pb.ConnectionFilter(principal="dave")),
                data=b"after the kill",
                type=pb.BroadcastRequest.TEXT,
            ),
            timeout=5,
        )
        got = outcomes(answer)
        assert got == {c: "NODE_UNREACHABLE" if node_of[c] == 0 else "DONE" for c in dave}, got
        # After the lease, its connections are NODE_LOST when listed by id.
        await asyncio.sleep(4)
        answer = await stub.SendToConnections(
            pb.SendToConnectionsRequest(
                gateway_id=gateway,
                targets=pb.Targets(connection_ids=dave),
                data=b"later",
                type=pb.BroadcastRequest.TEXT,
            ),
            timeout=10,
        )
        assert outcomes(answer) == {c: "NODE_LOST" if node_of[c] == 0 else "DONE" for c in dave}
        for node in nodes[1:]:
            log = node.log()
            assert "Traceback" not in log, log
            assert " ERROR " not in log, log


async def test_targets_must_be_named_and_bounded(
    kafka_settings: Settings, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        with_command_topics(kafka_settings) as settings,
        projector_and_api(settings, engine) as system,
        grpc.aio.insecure_channel(f"127.0.0.1:{system.server.port}") as channel,
    ):
        stub = pb_grpc.ConnectionDirectoryServiceStub(channel)

        def send(targets: pb.Targets, data: bytes = b"x") -> Any:
            return stub.SendToConnections(
                pb.SendToConnectionsRequest(
                    gateway_id="gw", targets=targets, data=data, type=pb.BroadcastRequest.TEXT
                ),
                timeout=10,
            )

        by_alice = pb.Targets(filter=pb.ConnectionFilter(principal="alice"))
        cases = [
            (send(pb.Targets()), "name a filter.principal"),
            (send(pb.Targets(filter=pb.ConnectionFilter(node_id="n"))), "name a filter.principal"),
            (send(pb.Targets(connection_ids=["a"] * 2)), "holds an id twice"),
            (send(pb.Targets(connection_ids=[str(i) for i in range(1001)])), "at most 1000 ids"),
            (send(pb.Targets(connection_ids=[""])), "connection_ids[0] is required"),
            (
                send(pb.Targets(connection_ids=["a"], filter=pb.ConnectionFilter(principal="p"))),
                "not both",
            ),
            (send(by_alice, data=b""), "data is required"),
            (send(by_alice, data=b"\xff"), "valid UTF-8"),
            (
                stub.DisconnectConnections(
                    pb.DisconnectConnectionsRequest(
                        gateway_id="gw", targets=by_alice, status_code=1006
                    )
                ),
                "status_code must be 1000 or 3000-4999",
            ),
            (
                stub.DisconnectConnections(
                    pb.DisconnectConnectionsRequest(
                        gateway_id="gw", targets=by_alice, reason="r" * 124
                    )
                ),
                "at most 123 bytes",
            ),
        ]
        for call, why in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
            assert why in (err.value.details() or ""), (why, err.value.details())
        # Nobody matches: zero targets, not an error.
        answer = await send(by_alice)
        assert list(answer.outcomes) == []
        # More targets than the limit: refused with nothing sent.
        now = time.time_ns()
        await ReadModel(engine).apply(
            [
                opened(f"many-{i}", "gw", now, node="n", incarnation=1, principal="many")
                for i in range(3)
            ]
        )
        monkeypatch.setattr(targets, "MAX_TARGETS", 2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await send(pb.Targets(filter=pb.ConnectionFilter(principal="many")))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "more than 2 connections" in (err.value.details() or "")


async def _small_receive_buffer(url: str) -> socket.socket:
    """A socket connected to the gateway at `url` that takes little before the sender's writes
    block."""
    where = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (where.hostname, where.port))
    return sock


async def test_a_node_killed_mid_operation_answers_no_target_of_it_done(
    kafka_settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    """Node 0 is SIGKILLed while it executes its part of a selector Send (it has written to some
    of its targets and is held up by a client that stopped reading): none of its targets is
    answered DONE, written or not; the other node's are."""
    big = random.Random(5).randbytes(131_072)  # incompressible: permessage-deflate is on
    async with (
        with_command_topics(kafka_settings) as settings,
        projector_and_api(settings, engine, lease_seconds=30.0) as system,
        grpc.aio.insecure_channel(f"127.0.0.1:{system.server.port}") as channel,
        contextlib.AsyncExitStack() as stack,
    ):
        nodes = await header_identity_nodes(stack, settings, 2, tmp_path)
        headers = {"X-Authenticated-User": "erin", "X-Tier": "gold"}
        readers: dict[str, tuple[int, ClientConnection]] = {}
        for i in range(8):
            client = await stack.enter_async_context(
                connect(nodes[i % 2].url, additional_headers=headers)
            )
            readers[own_id(client)] = (i % 2, client)
        # Reads one frame and no more: the node's writes to it block once the buffers are full.
        stuck = await stack.enter_async_context(
            connect(
                nodes[0].url,
                additional_headers=headers,
                sock=await _small_receive_buffer(nodes[0].url),
                max_queue=1,
            )
        )
        stuck_id = own_id(stuck)
        stub = pb_grpc.ConnectionDirectoryServiceStub(channel)
        gateway = settings.gateway_id
        for _ in range(300):
            count = await stub.CountConnections(pb.CountConnectionsRequest(gateway_id=gateway))
            if count.count == len(readers) + 1:
                break
            await asyncio.sleep(0.1)
        assert count.count == len(readers) + 1

        # Fill the stuck client's buffers until a write to it no longer finishes.
        for _ in range(100):
            answer = await stub.SendToConnections(
                pb.SendToConnectionsRequest(
                    gateway_id=gateway,
                    targets=pb.Targets(connection_ids=[stuck_id]),
                    data=big,
                    type=pb.BroadcastRequest.BINARY,
                ),
                timeout=1.5,
            )
            if answer.done == 0:
                break
        assert answer.done == 0, "the stuck client's buffers never filled"

        call = asyncio.ensure_future(
            stub.SendToConnections(
                pb.SendToConnectionsRequest(
                    gateway_id=gateway,
                    targets=pb.Targets(filter=pb.ConnectionFilter(principal="erin")),
                    data=b"mid-operation",
                    type=pb.BroadcastRequest.TEXT,
                ),
                timeout=6,
            )
        )
        # Node 0 is under way: one of its readers got the frame. Then it dies.
        on_node0 = [client for at, client in readers.values() if at == 0]
        first = await asyncio.wait_for(
            asyncio.wait(
                [asyncio.ensure_future(received(c)) for c in on_node0],
                return_when=asyncio.FIRST_COMPLETED,
            ),
            20,
        )
        assert first[0].pop().result() == "mid-operation"
        await nodes[0].kill()
        answer = await call
        got = outcomes(answer)
        expected = {
            cid: "NODE_UNREACHABLE" if at == 0 else "DONE" for cid, (at, _) in readers.items()
        }
        assert got == expected | {stuck_id: "NODE_UNREACHABLE"}, got
        for at, client in readers.values():
            if at == 1:
                assert await received(client) == "mid-operation"
