"""The connection directory over REST (api/transport/rest.py, the routes of directory.proto's
google.api.http annotations) with a real HTTP client against a running server, on both
read-model backends: pages, counts and filters equal gRPC's answers field by field (tokens
included), paging through a gateway lists each connection once, bad input is 400 with the
status JSON, tokens are required (401), calls are counted under the gRPC method, and a
broadcast without a command channel is 501."""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.application.directory import DIRECTORY_SERVICE_NAME
from conntrack.api.application.freshness import POSITION_HEADER
from conntrack.api.read.repository import ConnectionRepository
from conntrack.api.transport.auth import BearerTokens
from conntrack.api.transport.server import ApiServer
from conntrack.core.fold import NodeState
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2 as pb
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2_grpc as pb_grpc
from conntrack.core.timeutil import to_timestamp
from tests.support.readmodel import ReadModel, S, closed, opened
from tests.support.rest import Client, is_error

BASE = "/conntrack/directory/v1/gateways/"
TOKEN = "tok-rest-dir-8f2c"


def rfc3339(ns: int) -> str:
    return to_timestamp(ns).ToJsonString()


def list_path(gateway: str, suffix: str = "", **query: Any) -> str:
    path = BASE + urllib.parse.quote(gateway, safe="") + "/connections" + suffix
    return path + ("?" + urllib.parse.urlencode(query) if query else "")


async def seed(engine: AsyncEngine) -> int:
    """Gateway gw-r: 23 open connections on n1, 9 on n2 (some from 10.0.0.2, some idle), 4 of
    a gateway without the node role, 3 closed; gw-other: 2. Returns the base time."""
    now = time.time_ns()
    base = now - 3600 * S
    nodes = [
        NodeState("n1", 5, now - 100 * S, now, "gw-r"),
        NodeState("n2", 2, now - 100 * S, now, "gw-r"),
    ]
    states = []
    for i in range(23):
        states.append(
            opened(
                f"a{i:03d}",
                "gw-r",
                base + i * S,
                node="n1",
                incarnation=5,
                principal=f"user-{i % 4}",
                labels={"tenant": f"t{i % 3}", "app": "chat"},
            )
        )
    for i in range(9):
        ip = "10.0.0.2" if i % 3 == 0 else "10.0.0.1"
        active = base + 10 * S if i % 2 else None
        states.append(
            opened(
                f"b{i:03d}",
                "gw-r",
                base + (50 + i) * S,
                ip=ip,
                active=active,
                node="n2",
                incarnation=2,
            )
        )
    for i in range(4):
        states.append(opened(f"p{i:03d}", "gw-r", base + (70 + i) * S))
    for i in range(3):
        states.append(
            closed(opened(f"c{i:03d}", "gw-r", base + i * S, node="n1", incarnation=5), now)
        )
    states.extend(opened(f"o{i}", "gw-other", base, node="n1", incarnation=5) for i in range(2))
    await ReadModel(engine).apply(states, nodes)
    return base


@contextlib.asynccontextmanager
async def serving(
    engine: AsyncEngine, **options: Any
) -> AsyncIterator[tuple[ApiServer, Client, pb_grpc.ConnectionDirectoryServiceStub]]:
    async with (
        ApiServer(
            ConnectionRepository(engine),
            "127.0.0.1:0",
            freshness_ttl_seconds=0,
            rest_port=0,
            **options,
        ) as server,
        aiohttp.ClientSession() as session,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield (
            server,
            Client(session, f"http://127.0.0.1:{server.rest_port}"),
            pb_grpc.ConnectionDirectoryServiceStub(channel),
        )


def as_json(message: Any) -> Any:
    return MessageToDict(message, always_print_fields_with_no_presence=True)


async def test_list_and_count_answer_as_grpc_does_with_filters_and_paging(
    engine: AsyncEngine,
) -> None:
    base = await seed(engine)
    async with serving(engine) as (server, client, stub):
        cases: list[tuple[dict[str, Any], pb.ConnectionFilter]] = [
            ({}, pb.ConnectionFilter()),
            ({"filter.nodeId": "n2"}, pb.ConnectionFilter(node_id="n2")),
            ({"filter.node_id": "n1"}, pb.ConnectionFilter(node_id="n1")),  # proto names too
            ({"filter.sourceIp": "10.0.0.2"}, pb.ConnectionFilter(source_ip="10.0.0.2")),
            ({"filter.principal": "user-1"}, pb.ConnectionFilter(principal="user-1")),
            (
                {"filter.labelSelector": "tenant in (t0, t2), app=chat"},
                pb.ConnectionFilter(label_selector="tenant in (t0, t2), app=chat"),
            ),
            (
                {"filter.connectedAfter": rfc3339(base + 55 * S)},
                pb.ConnectionFilter(connected_after=to_timestamp(base + 55 * S)),
            ),
            (
                {
                    "filter.connectedBefore": rfc3339(base + 10 * S + 1),  # nanoseconds kept
                    "filter.nodeId": "n1",
                },
                pb.ConnectionFilter(connected_before=to_timestamp(base + 10 * S + 1), node_id="n1"),
            ),
            (
                {"filter.lastActiveBefore": rfc3339(base + 30 * S)},
                pb.ConnectionFilter(last_active_before=to_timestamp(base + 30 * S)),
            ),
        ]
        for query, where in cases:
            # Paging by 4: every REST page equals the gRPC page, token included.
            token, listed = "", list[str]()
            while True:
                rest_query = dict(query, pageSize=4, **({"pageToken": token} if token else {}))
                code, page, headers = await client.call("GET", list_path("gw-r", **rest_query))
                assert code == 200, (query, page)
                assert POSITION_HEADER in headers
                expected = await stub.ListConnections(
                    pb.ListConnectionsRequest(
                        gateway_id="gw-r", filter=where, page_size=4, page_token=token
                    ),
                    timeout=30,
                )
                assert page == as_json(expected), query
                listed.extend(entry["connection"]["id"] for entry in page["connections"])
                token = page["nextPageToken"]
                if not token:
                    break
            assert listed == sorted(set(listed))  # each once, in id order
            code, counted, headers = await client.call("GET", list_path("gw-r", ":count", **query))
            assert code == 200, counted
            assert POSITION_HEADER in headers
            grpc_count = await stub.CountConnections(
                pb.CountConnectionsRequest(gateway_id="gw-r", filter=where), timeout=30
            )
            assert counted == as_json(grpc_count) == {"count": str(len(listed))}, query

        # What the seed says: 23 + 9 + 4 open, closed and other gateways left out.
        code, counted, _ = await client.call("GET", list_path("gw-r", ":count"))
        assert counted == {"count": "36"}
        code, page, _ = await client.call("GET", list_path("gw-r", pageSize=1000))
        assert len(page["connections"]) == 36
        assert page["nextPageToken"] == ""
        first = page["connections"][0]
        assert first["nodeId"] == "n1"
        assert first["connection"]["gatewayId"] == "gw-r"
        code, page, _ = await client.call("GET", list_path("gw-r", **{"filter.nodeId": "n2"}))
        assert [e["connection"]["id"] for e in page["connections"]] == [
            f"b{i:03d}" for i in range(9)
        ]
        # The default page size (100) when none is given; an unknown gateway is an empty page.
        assert (await client.call("GET", list_path("nobody")))[:2] == (
            200,
            {"connections": [], "nextPageToken": ""},
        )

        def handled(method: str, grpc_code: str) -> float:
            value = server.metrics.registry.get_sample_value(
                "grpc_server_handled_total",
                {
                    "grpc_type": "unary",
                    "grpc_service": DIRECTORY_SERVICE_NAME,
                    "grpc_method": method,
                    "grpc_code": grpc_code,
                },
            )
            return value or 0.0

        assert handled("CountConnections", "OK") == 2 * len(cases) + 1  # REST and gRPC


async def test_bad_requests_are_400_with_the_status_json(engine: AsyncEngine) -> None:
    await seed(engine)
    async with serving(engine) as (_, client, stub):
        code, page, _ = await client.call("GET", list_path("gw-r", pageSize=5))
        token = page["nextPageToken"]
        assert code == 200
        assert token
        bad: list[tuple[str, str]] = [
            (list_path("gw-r", pageToken="not-a-token"), "page_token is not valid"),
            # A token of another query (another filter) is refused as well.
            (list_path("gw-r", pageToken=token, **{"filter.nodeId": "n1"}), "page_token"),
            (list_path("gw-r", pageSize=1001), "page_size must be at most 1000"),
            (list_path("gw-r", pageSize=-1), "page_size must not be negative"),
            (list_path("gw-r", pageSize="ten"), "query string"),
            (list_path("gw-r", nodeId="n1"), "'nodeId' is not a field"),
            (list_path("gw-r", **{"filter.color": "red"}), "is not a field"),
            (list_path("gw-r", filter="n1"), "does not name a single value"),
            (list_path("gw-r", **{"filter.connectedAfter": "yesterday"}), "query string"),
            (list_path("gw-r") + "?pageSize=2&pageSize=3", "given twice"),
            (list_path("gw-r") + "?filter.nodeId=%ff", "valid UTF-8"),
            (list_path("g" * 256), "gateway_id must be at most 255"),
            (list_path("gw-r", ":count", **{"filter.nodeId": "n" * 256}), "filter.node_id"),
            (list_path("gw-r", **{"filter.labelSelector": "tenant"}), "filter.label_selector"),
            (list_path("gw-r", **{"filter.principal": "p" * 256}), "filter.principal"),
            (BASE + "%ff/connections", "gateway_id must be valid UTF-8"),
        ]
        for path, why in bad:
            code, answer, _ = await client.call("GET", path)
            assert code == 400, (path, answer)
            assert is_error(answer, grpc.StatusCode.INVALID_ARGUMENT, containing=why), (
                path,
                answer,
            )
        # The same refusal over gRPC, word for word.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListConnections(
                pb.ListConnectionsRequest(gateway_id="gw-r", page_token="not-a-token"), timeout=30
            )
        code, answer, _ = await client.call("GET", list_path("gw-r", pageToken="not-a-token"))
        assert answer["message"] == err.value.details()
        # Broadcast without a command channel: 501; with bad data: 400 first.
        body = {"data": "eA==", "type": "TEXT"}
        code, answer, _ = await client.call("POST", list_path("gw-r", ":broadcast"), body)
        assert code == 501, answer
        assert is_error(answer, grpc.StatusCode.UNIMPLEMENTED, containing="no command channel")
        code, answer, _ = await client.call(
            "POST", list_path("gw-r", ":broadcast"), {"data": "", "type": "TEXT"}
        )
        assert code == 400
        assert is_error(answer, grpc.StatusCode.INVALID_ARGUMENT, containing="data")
        # The wrong method on a directory route.
        code, answer, _ = await client.call("DELETE", list_path("gw-r"))
        assert code == 405, answer


async def test_tokens_are_required_on_every_directory_route(engine: AsyncEngine) -> None:
    await seed(engine)
    async with serving(engine, tokens=BearerTokens([TOKEN])) as (_, client, _stub):
        routes = [
            ("GET", list_path("gw-r"), None),
            ("GET", list_path("gw-r", ":count"), None),
            ("POST", list_path("gw-r", ":broadcast"), {"data": "eA==", "type": "TEXT"}),
        ]
        for method, path, body in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                code, answer, answer_headers = await client.call(
                    method, path, body, headers=headers
                )
                assert code == 401, (path, answer)
                assert is_error(answer, grpc.StatusCode.UNAUTHENTICATED, containing="bearer")
                assert answer_headers["WWW-Authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {TOKEN}"}
        code, counted, _ = await client.call("GET", list_path("gw-r", ":count"), headers=good)
        assert (code, counted) == (200, {"count": "36"})
        code, page, _ = await client.call("GET", list_path("gw-r", pageSize=2), headers=good)
        assert code == 200
        assert len(page["connections"]) == 2


async def test_answers_in_time_over_rest_are_grpcs(engine: AsyncEngine) -> None:
    """ListConnections and CountConnections with asOf, GetConnectionAsOf, GetLastSeen and
    ListSessions answer over REST what they answer over gRPC; a moment before the kept history
    is 400 with FAILED_PRECONDITION's status JSON."""
    base = await seed(engine)
    now = time.time_ns()
    at = base + 60 * S
    principals = BASE + "gw-r/principals"
    async with serving(engine) as (_, client, stub):
        grpc_page = await stub.ListConnections(
            pb.ListConnectionsRequest(gateway_id="gw-r", page_size=7, as_of=to_timestamp(at))
        )
        code, page, headers = await client.call(
            "GET", list_path("gw-r", pageSize=7, asOf=rfc3339(at))
        )
        assert code == 200
        assert page == as_json(grpc_page)
        assert len(page["connections"]) == 7
        assert POSITION_HEADER in headers
        code, counted, _ = await client.call("GET", list_path("gw-r", ":count", asOf=rfc3339(at)))
        grpc_count = await stub.CountConnections(
            pb.CountConnectionsRequest(gateway_id="gw-r", as_of=to_timestamp(at))
        )
        assert (code, counted) == (200, as_json(grpc_count))
        # The three closed ones (at `now`) were open at `at`; the idle rule is not judged then.
        assert int(counted["count"]) == 23 + 9 + 3  # the p* connected after `at`
        for cid in ("a001", "c001", "b008", "p001"):
            code, one, _ = await client.call(
                "GET", f"/conntrack/directory/v1/connections/{cid}:asOf?asOf={rfc3339(at)}"
            )
            request = pb.GetConnectionAsOfRequest(connection_id=cid, as_of=to_timestamp(at))
            if cid == "p001":  # it connected after `at`
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetConnectionAsOf(request)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                assert code == 404
                assert is_error(one, grpc.StatusCode.NOT_FOUND)
                continue
            assert (code, one) == (200, as_json(await stub.GetConnectionAsOf(request)))
            assert one["state"] == "OPEN"
        code, seen, _ = await client.call("GET", f"{principals}:lastSeen?principal=user-1")
        grpc_seen = await stub.GetLastSeen(
            pb.GetLastSeenRequest(gateway_id="gw-r", principal="user-1")
        )
        assert (code, seen) == (200, as_json(grpc_seen))
        assert seen["connectedNow"] is True
        query = urllib.parse.urlencode(
            {"principal": "user-1", "windowStart": rfc3339(base), "pageSize": 2}
        )
        code, sessions, _ = await client.call("GET", f"{principals}:sessions?{query}")
        grpc_sessions = await stub.ListSessions(
            pb.ListSessionsRequest(
                gateway_id="gw-r", principal="user-1", window_start=to_timestamp(base), page_size=2
            )
        )
        assert (code, sessions) == (200, as_json(grpc_sessions))
        assert len(sessions["sessions"]) == 2
        assert sessions["nextPageToken"]
        # A page token is bound to its moment.
        code, page, _ = await client.call("GET", list_path("gw-r", pageSize=7, asOf=rfc3339(at)))
        code, refused, _ = await client.call(
            "GET",
            list_path("gw-r", pageSize=7, asOf=rfc3339(at + S), pageToken=page["nextPageToken"]),
        )
        assert code == 400
        assert is_error(refused, grpc.StatusCode.INVALID_ARGUMENT, containing="page_token")
        code, refused, _ = await client.call(
            "GET", list_path("gw-r", asOf=rfc3339(now - 30 * 24 * 3600 * S))
        )
        assert code == 400
        assert is_error(refused, grpc.StatusCode.FAILED_PRECONDITION, containing="oldest")
