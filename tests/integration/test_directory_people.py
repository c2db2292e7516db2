"""The connection directory by principal and by label selector, on both read-model backends,
over a real channel: lists and counts equal the truth while connections come and go between
pages, the queries walk their indexes, and bad selectors are INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import random
import time
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.read.repository import (
    DirectoryFilter,
    directory_page_statement,
    label_candidates_statement,
)
from conntrack.core.fold import ConnectionState, NodeState
from conntrack.core.labels import from_json, matches, parse_selector
from conntrack.core.liveness import Liveness
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2 as pb
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2_grpc as pb_grpc
from tests.support.directory import channel_to, failure, ids, list_all, request, serving
from tests.support.readmodel import ReadModel, S, closed, opened

NODES = ("node-a", "node-b", "node-c")
TENANTS = [f"t{i}" for i in range(10)]
DEVICES = ["web", "ios", "android"]


def person(rnd: random.Random, cid: str, at: int) -> ConnectionState:
    user = rnd.randrange(2000)
    return opened(
        cid,
        "gw-people",
        at,
        node=rnd.choice(NODES),
        incarnation=1,
        principal=f"user-{user}",
        labels={"tenant": TENANTS[user % 10], "device": rnd.choice(DEVICES)},
    )


def count_request(**filters: Any) -> pb.CountConnectionsRequest:
    return pb.CountConnectionsRequest(gateway_id="gw-people", filter=pb.ConnectionFilter(**filters))


async def test_by_principal_and_by_label_equal_the_truth_while_connections_come_and_go(
    read_engine: AsyncEngine,
) -> None:
    """10,000 connections on three nodes of 2,000 principals: every page of a principal's or a
    selector's listing lists each connection open throughout exactly once, nothing closed
    before, nothing of another principal or label; counts equal the truth at rest."""
    rnd = random.Random(26)
    now = time.time_ns()
    model = ReadModel(read_engine)
    nodes = [NodeState(n, 1, now - 60 * S, now, "gw-people") for n in NODES]
    states = {
        s.connection_id: s
        for s in (person(rnd, f"{rnd.randrange(16**12):012x}", now - S) for _ in range(10_000))
    }
    for start in range(0, len(states), 2500):
        await model.apply(list(states.values())[start : start + 2500], nodes)
    # A few of each kind are closed before the listing begins.
    for cid in rnd.sample(sorted(states), 500):
        await model.apply([closed(states.pop(cid), now)])
    # Others of the same principals and labels on another gateway: never listed.
    await model.apply(
        [
            opened(f"other-{i}", "gw-other", now, principal="user-7", labels={"tenant": "t7"})
            for i in range(50)
        ]
    )

    def truth(**where: str) -> list[str]:
        selector = parse_selector(where.get("label_selector", ""))
        return sorted(
            cid
            for cid, s in states.items()
            if ("principal" not in where or s.principal == where["principal"])
            and matches(selector, from_json(s.labels))
        )

    web_user = next(s.principal for s in states.values() if '"web"' in (s.labels or ""))
    assert web_user is not None
    queries: list[dict[str, str]] = [
        {"principal": "user-7"},
        {"principal": "user-1999"},
        {"label_selector": "tenant=t3"},
        {"label_selector": "tenant=t3, device in (ios, android)"},
        {"label_selector": "device in (web)", "principal": web_user},
        {"label_selector": "tenant in (t1, t2), device=ios"},
    ]
    # No lease: the nodes' rows are written once, and a slow run must not see them lost.
    no_lease = Liveness.of_seconds(0)
    async with serving(read_engine, liveness=no_lease) as server, channel_to(server) as channel:
        stub = pb_grpc.ConnectionDirectoryServiceStub(channel)
        for where in queries:
            want = truth(**where)
            assert want, where
            counted = await stub.CountConnections(count_request(**where))
            assert counted.count == len(want), where
            entries = await list_all(stub, "gw-people", 7, **where)
            assert ids(entries) == want, where
            for entry in entries[:20]:
                s = states[entry.connection.id]
                assert entry.principal == s.principal
                assert dict(entry.labels) == from_json(s.labels)
                assert entry.node_id == s.node_id

        # Connections come and go between the pages of a selector's listing.
        where = {"label_selector": "tenant=t3"}
        at_start = set(truth(**where))
        seen: list[str] = []
        token = ""
        churned: set[str] = set()
        arrived: set[str] = set()
        while True:
            page = await stub.ListConnections(request("gw-people", 50, token, **where))
            seen.extend(ids(page.connections))
            if not page.next_page_token:
                break
            token = page.next_page_token
            arrivals = [
                person(rnd, f"{rnd.randrange(16**12):012x}", time.time_ns()) for _ in range(20)
            ]
            gone = rnd.sample(sorted(states), 15)
            churned.update(gone)
            changes = [closed(states.pop(c), time.time_ns()) for c in gone]
            states.update((a.connection_id, a) for a in arrivals)
            arrived.update(a.connection_id for a in arrivals)
            await model.apply(arrivals + changes)
        assert len(seen) == len(set(seen))
        assert seen == sorted(seen)
        assert at_start - churned <= set(seen)
        assert set(seen) <= at_start | arrived
        assert all(
            matches(parse_selector("tenant=t3"), from_json(states[c].labels))
            for c in set(seen) - churned
        )
        # At rest again: counts equal the truth after the churn.
        for where in queries:
            counted = await stub.CountConnections(count_request(**where))
            assert counted.count == len(truth(**where)), where

        # A selector or principal that matches nothing is an empty answer, not an error.
        for nothing in (
            {"principal": "nobody"},
            {"label_selector": "tenant=t3, tenant=t4"},
            {"label_selector": "unknown-key=x"},
        ):
            assert ids(await list_all(stub, "gw-people", 100, **nothing)) == []
            assert (await stub.CountConnections(count_request(**nothing))).count == 0


async def test_bad_principals_and_selectors_are_invalid_argument_naming_the_field(
    read_engine: AsyncEngine,
) -> None:
    async with serving(read_engine) as server, channel_to(server) as channel:
        stub = pb_grpc.ConnectionDirectoryServiceStub(channel)
        cases = [
            ({"principal": "p" * 256}, "filter.principal must be at most 255 characters"),
            ({"principal": "a\x00"}, "filter.principal must not contain NUL"),
            ({"label_selector": "tenant"}, "filter.label_selector is not `key=value`"),
            ({"label_selector": "tenant in ()"}, "names no value"),
            ({"label_selector": "-x=1"}, "filter.label_selector key '-x'"),
            ({"label_selector": "k=" + "v" * 256}, "must be at most 255 characters"),
            (
                {"label_selector": ",".join(f"k{i}=v" for i in range(17))},
                "at most 16 keys, got 17",
            ),
            (
                {"label_selector": "k in (" + ",".join(str(i) for i in range(101)) + ")"},
                "at most 100 values",
            ),
        ]
        for filters, message in cases:
            for call in (
                stub.ListConnections(request("gw-people", 10, **filters)),
                stub.CountConnections(count_request(**filters)),
            ):
                err = await failure(call)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, filters
                assert message in (err.details() or ""), (message, err.details())


@pytest.mark.parametrize(
    ("where", "index"),
    [
        (DirectoryFilter("gw-big", principal="user-3"), "ix_connections_principal"),
        (
            DirectoryFilter("gw-big", labels=parse_selector("tenant=t3")),
            "ix_connection_labels_gateway_id",
        ),
    ],
)
async def test_a_principal_or_selector_page_walks_its_index(
    read_engine: AsyncEngine,
    backend: str,
    where: DirectoryFilter,
    index: str,
) -> None:
    """Over 50,000 connections of 2,000 principals (ANALYZEd), a page by principal or by label
    is found through its index, not by a scan of the gateway's connections (a selector's page
    starts with the next ids of its first requirement, from the label index)."""
    rnd = random.Random(3)
    now = time.time_ns()
    model = ReadModel(read_engine)
    states = [
        opened(
            f"{rnd.randrange(16**12):012x}",
            "gw-big",
            now,
            principal=f"user-{(u := rnd.randrange(2000))}",
            labels={"tenant": f"t{u % 100}"},
        )
        for _ in range(50_000)
    ]
    for start in range(0, len(states), 10_000):
        await model.apply(states[start : start + 10_000])
    live = Liveness(30 * S, 1800 * S, 86400 * S).bounds({}, now)
    statement = (
        label_candidates_statement(where, None, 101)
        if where.labels
        else directory_page_statement(where, live, None, 101)
    )
    sql = str(statement.compile(read_engine.sync_engine, compile_kwargs={"literal_binds": True}))
    explain = "EXPLAIN" if backend == "postgres" else "EXPLAIN QUERY PLAN"
    async with read_engine.connect() as conn:
        await conn.execute(text("ANALYZE"))
        plan = "\n".join(str(r[-1]) for r in await conn.execute(text(f"{explain} {sql}")))
    assert index in plan, plan
    assert "Seq Scan" not in plan, plan
    assert "SCAN connections" not in plan.replace("SCAN connections USING", ""), plan
