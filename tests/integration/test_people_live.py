"""People at full size through the whole system, on both read-model backends: 10,000 real
WebSocket clients of 2,000 principals on three reference gateway nodes (trusted-header identity,
a `tier` label from a header), the projector and the API on the real broker. Listing and counting
by principal and by label selector equal the truth, also while clients come and go between
pages; a Send to a principal reaches exactly that principal's open sockets, once each, with one
outcome per target."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2 as pb
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2_grpc as pb_grpc
from conntrack.core.settings import Settings
from tests.support.crowd import Crowd, Headers
from tests.support.directory import ids, list_all, request
from tests.support.gateway import header_identity_nodes, projector_and_api, with_command_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CONNECTIONS = 10_000
PRINCIPALS = 2_000
NODES = 3


def who(rnd: random.Random, i: int) -> Headers:
    return {
        "X-Authenticated-User": f"user-{i % PRINCIPALS}",
        "X-Tier": rnd.choice(["gold", "free", "free"]),
    }


async def settled(
    stub: pb_grpc.ConnectionDirectoryServiceStub, gateway: str, want: int, **filters: Any
) -> int:
    """The count once it is `want` (the projector catching up), or the last one after 60 s."""
    for _ in range(600):
        count = await stub.CountConnections(
            pb.CountConnectionsRequest(gateway_id=gateway, filter=pb.ConnectionFilter(**filters)),
            timeout=30,
        )
        if count.count == want:
            break
        await asyncio.sleep(0.1)
    return int(count.count)


async def test_ten_thousand_people_on_three_nodes(
    kafka_settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    rnd = random.Random(2026)
    async with (
        with_command_topics(kafka_settings) as settings,
        projector_and_api(settings, engine) as system,
        grpc.aio.insecure_channel(f"127.0.0.1:{system.server.port}") as channel,
        contextlib.AsyncExitStack() as stack,
    ):
        nodes = await header_identity_nodes(stack, settings, NODES, tmp_path)
        crowds = [await stack.enter_async_context(Crowd(node.url)) for node in nodes]
        # Who each open connection is: principal, tier, and the crowd holding it.
        people: dict[str, tuple[str, str, int]] = {}

        async def arrive(at: int, headers: list[Headers]) -> list[str]:
            opened = await crowds[at].open(headers)
            for cid, h in zip(opened, headers, strict=True):
                people[cid] = (h["X-Authenticated-User"], h["X-Tier"], at)
            return opened

        shares = [[who(rnd, i) for i in range(CONNECTIONS) if i % NODES == at] for at in range(3)]
        await asyncio.gather(*(arrive(at, share) for at, share in enumerate(shares)))
        assert len(people) == CONNECTIONS
        stub = pb_grpc.ConnectionDirectoryServiceStub(channel)
        gateway = settings.gateway_id

        def truth(principal: str | None = None, tier: str | None = None) -> list[str]:
            return sorted(
                cid
                for cid, (p, t, _) in people.items()
                if (principal is None or p == principal) and (tier is None or t == tier)
            )

        assert await settled(stub, gateway, CONNECTIONS) == CONNECTIONS
        # By principal, by label, and both.
        for user in rnd.sample(range(PRINCIPALS), 10):
            principal = f"user-{user}"
            listed = await stub.ListConnections(
                request(gateway, 100, principal=principal), timeout=30
            )
            assert ids(listed.connections) == truth(principal), principal
            assert {e.principal for e in listed.connections} == {principal}
        gold = truth(tier="gold")
        assert await settled(stub, gateway, len(gold), label_selector="tier=gold") == len(gold)
        assert ids(await list_all(stub, gateway, 1000, label_selector="tier=gold")) == gold
        both = {"principal": "user-7", "label_selector": "tier in (gold)"}
        assert ids(await list_all(stub, gateway, 10, **both)) == truth("user-7", "gold")

        # Clients come and go between the pages of a selector's listing.
        at_start = set(gold)
        seen: list[str] = []
        churned: set[str] = set()
        arrived: set[str] = set()
        token = ""
        while True:
            page = await stub.ListConnections(
                request(gateway, 500, token, label_selector="tier=gold"), timeout=30
            )
            seen.extend(ids(page.connections))
            if not page.next_page_token:
                break
            token = page.next_page_token
            at = rnd.randrange(NODES)
            leaving = rnd.sample([c for c, (_, _, a) in people.items() if a == at], 40)
            await crowds[at].close(leaving)
            churned.update(leaving)
            for cid in leaving:
                del people[cid]
            newcomers = [who(rnd, rnd.randrange(PRINCIPALS)) for _ in range(40)]
            arrived.update(await arrive(at, newcomers))
        assert len(seen) == len(set(seen))
        assert seen == sorted(seen)
        assert at_start - churned <= set(seen)
        assert set(seen) <= at_start | arrived
        # At rest again: the counts equal the truth after the churn.
        assert await settled(stub, gateway, len(people)) == len(people)
        gold = truth(tier="gold")
        assert await settled(stub, gateway, len(gold), label_selector="tier=gold") == len(gold)

        # A Send to a principal: each of their open sockets gets the frame once, DONE each.
        counts: dict[str, int] = {}
        for p, _, _ in people.values():
            counts[p] = counts.get(p, 0) + 1
        principal = max(sorted(counts), key=lambda p: counts[p])
        targets = truth(principal)
        assert len({people[c][2] for c in targets}) > 1, "the principal's sockets on one node"
        answer = await stub.SendToConnections(
            pb.SendToConnectionsRequest(
                gateway_id=gateway,
                targets=pb.Targets(filter=pb.ConnectionFilter(principal=principal)),
                data=b"for you",
                type=pb.BroadcastRequest.TEXT,
            ),
            timeout=30,
        )
        assert [o.connection_id for o in answer.outcomes] == targets
        assert {pb.TargetOutcome.Result.Name(o.result) for o in answer.outcomes} == {"DONE"}
        assert answer.done == len(targets)
        await asyncio.sleep(1.0)  # frames on their way
        frames: dict[str, list[str | bytes]] = {}
        for crowd in crowds:
            frames |= await crowd.received()
        got = {cid: f.count("for you") for cid, f in frames.items() if "for you" in f}
        assert got == dict.fromkeys(targets, 1)
        for node in nodes:
            log = node.log()
            assert "Traceback" not in log, log
            assert " ERROR " not in log, log
