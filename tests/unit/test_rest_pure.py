"""The REST mapping's pure parts: the route table read from the .proto's annotations, the
status mapping, grpc-timeout, proto3 JSON base64, and the OpenAPI document's integrity."""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from conntrack.api.application.directory import DIRECTORY_SERVICE_NAME
from conntrack.api.application.service import SERVICE_NAME
from conntrack.api.transport import openapi, rest
from conntrack.api.transport.rest_requests import valid_base64
from conntrack.api.transport.rest_routes import ROUTES
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)


def test_routes_are_upstreams_annotations() -> None:
    upstream = [r for r in ROUTES if r.service == SERVICE_NAME]
    assert [(r.rpc, r.http_method, r.path, r.body) for r in upstream] == [
        ("Get", "GET", "/apigateways/websocket/v1/connections/{connectionId}", ""),
        ("Send", "POST", "/apigateways/websocket/v1/connections/{connectionId}:send", "*"),
        ("Disconnect", "DELETE", "/apigateways/websocket/v1/connections/{connectionId}", ""),
    ]
    assert all(r.path_fields == ("connection_id",) for r in upstream)
    assert [r.path_suffix for r in upstream] == ["", ":send", ""]
    assert upstream[1].request_type is svc.SendToConnectionRequest
    assert all(r.query_fields == () for r in upstream)  # upstream's requests: the id alone


def test_directory_routes_are_its_annotations() -> None:
    directory = [r for r in ROUTES if r.service == DIRECTORY_SERVICE_NAME]
    base = "/conntrack/directory/v1/gateways/{gatewayId}/connections"
    assert [(r.rpc, r.http_method, r.path, r.body) for r in directory] == [
        ("ListConnections", "GET", base, ""),
        ("CountConnections", "GET", base + ":count", ""),
        ("Broadcast", "POST", base + ":broadcast", "*"),
        ("SendToConnections", "POST", base + ":send", "*"),
        ("DisconnectConnections", "POST", base + ":disconnect", "*"),
        ("GetConnectionAsOf", "GET", "/conntrack/directory/v1/connections/{connectionId}:asOf", ""),
        ("GetLastSeen", "GET", base.replace("connections", "principals:lastSeen"), ""),
        ("ListSessions", "GET", base.replace("connections", "principals:sessions"), ""),
    ]
    assert [r.path_fields for r in directory] == [("gateway_id",)] * 5 + [
        ("connection_id",),
        ("gateway_id",),
        ("gateway_id",),
    ]
    assert [[f.name for f in r.query_fields] for r in directory] == [
        ["filter", "page_size", "page_token", "as_of"],
        ["filter", "as_of"],
        [],
        [],
        [],
        ["as_of"],
        ["principal"],
        ["principal", "window_start", "window_end", "page_size", "page_token"],
    ]
    parameters = openapi.document(secured=False)["paths"][base]["get"]["parameters"]
    assert [p["name"] for p in parameters if p["in"] == "query"] == [
        "filter.nodeId",
        "filter.sourceIp",
        "filter.lastActiveBefore",
        "filter.connectedBefore",
        "filter.connectedAfter",
        "filter.principal",
        "filter.labelSelector",
        "pageSize",
        "pageToken",
        "asOf",
    ]


def test_every_grpc_code_has_an_http_status() -> None:
    assert set(rest.HTTP_STATUS) == set(grpc.StatusCode)
    expected = {
        "INVALID_ARGUMENT": 400,
        "UNAUTHENTICATED": 401,
        "PERMISSION_DENIED": 403,
        "NOT_FOUND": 404,
        "RESOURCE_EXHAUSTED": 429,
        "UNAVAILABLE": 503,
        "UNIMPLEMENTED": 501,
        "DEADLINE_EXCEEDED": 504,
    }
    assert {c.name: rest.HTTP_STATUS[c] for c in grpc.StatusCode if c.name in expected} == expected


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("5S", 5.0), ("1500m", 1.5), ("2M", 120.0), ("1H", 3600.0), ("250u", 0.00025)],
)
def test_grpc_timeout(header: str, seconds: float) -> None:
    assert rest.grpc_timeout_seconds(header) == pytest.approx(seconds)


@pytest.mark.parametrize("header", ["", "5", "S", "123456789S", "-1S", "1.5S", "5s", "soon"])
def test_grpc_timeout_refused(header: str) -> None:
    with pytest.raises(ValueError, match="grpc-timeout"):
        rest.grpc_timeout_seconds(header)


@given(st.binary(max_size=64), st.booleans(), st.booleans())
def test_base64_accepted_as_proto3_json_writes_or_reads_it(
    data: bytes, urlsafe: bool, padded: bool
) -> None:
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()
    if not padded:
        text = text.rstrip("=")
    assert valid_base64(text)
    message = json_format.Parse(json.dumps({"data": text}), svc.SendToConnectionRequest())
    assert message.data == data


@pytest.mark.parametrize("text", ["aGk!!", "a", "aGk= ", "a=b=", "aGk===", "*"])
def test_base64_refused(text: str) -> None:
    assert not valid_base64(text)


def _refs(value: Any) -> set[str]:
    if isinstance(value, dict):
        found = {value["$ref"]} if "$ref" in value else set()
        return found.union(*(_refs(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_refs(v) for v in value))
    return set()


@pytest.mark.parametrize("secured", [False, True])
def test_openapi_document_refers_only_to_its_own_schemas(secured: bool) -> None:
    document = openapi.document(secured=secured)
    schemas = document["components"]["schemas"]
    assert {ref.rsplit("/", 1)[1] for ref in _refs(document)} <= set(schemas)
    assert set(schemas["Connection"]["properties"]) == {
        "id",
        "gatewayId",
        "identity",
        "connectedAt",
        "lastActiveAt",
    }
    assert schemas["Connection"]["properties"]["connectedAt"]["format"] == "date-time"
    operations = [op for path in document["paths"].values() for op in path.values()]
    assert all(("security" in op) == secured for op in operations if op["operationId"] != "openapi")
    assert ("securitySchemes" in document["components"]) == secured
