"""A REST call's request message, made as grpc-gateway makes it: the body in the proto3 JSON
mapping, a GET's other fields from the query string (`filter.nodeId=...`, proto or JSON names),
the path's variables over both; ApiError INVALID_ARGUMENT (or RESOURCE_EXHAUSTED, 413) for a
request that cannot be made."""

from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Final

import grpc
from aiohttp import web
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from conntrack.api.application.call import ApiError
from conntrack.api.transport.rest_routes import Route

MAX_BODY_KEY: Final = web.AppKey("max_body_bytes", int)


class RestAbort(ApiError):
    """An ApiError with an HTTP status other than the code's conventional one (413 for a body
    over the limit)."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int) -> None:
        super().__init__(code, message)
        self.http_status = http_status


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """What a REST handler passes down the wrapped behaviors: the request message is made from
    it innermost, after authentication and the concurrency cap, as gRPC decodes a message."""

    request: web.Request
    route: Route


# proto3 JSON bytes: standard or URL-safe base64, padded or not (python's decoder would drop
# characters outside the alphabet silently).
_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")


def _invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


async def request_message(http: HttpRequest) -> Message:
    """The route's request message from the body (proto3 JSON) and the path; ApiError
    INVALID_ARGUMENT (or RESOURCE_EXHAUSTED, 413) for one that cannot be made."""
    route, request = http.route, http.request
    message = route.request_type()
    if route.body == "*":
        try:
            body = await request.read()  # at most client_max_size bytes are ever read
        except web.HTTPRequestEntityTooLarge as exc:
            limit = request.app[MAX_BODY_KEY]
            raise RestAbort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request body larger than {limit} bytes",
                http_status=exc.status,
            ) from None
        _parse_body(body, message)
    elif route.query_fields:
        _parse_query(request, route, message)
    raw_path = request.raw_path.partition("?")[0]
    try:
        urllib.parse.unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        names = " and ".join(route.path_fields) or "the path"
        raise _invalid(f"{names} must be valid UTF-8 (percent-decoded path)") from None
    for field in route.path_fields:
        json_name = route.request_type.DESCRIPTOR.fields_by_name[field].json_name
        try:
            # The path's value wins over one in the body, as in grpc-gateway.
            setattr(message, field, request.match_info[json_name])
        except (TypeError, ValueError) as exc:
            raise _invalid(f"{field} in the path is not a valid string: {exc}") from None
    return message


def _parse_body(body: bytes, message: Message) -> None:
    try:
        value = json.loads(body or b"{}", object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"request body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _invalid("request body must be a JSON object")
    for field in message.DESCRIPTOR.fields:
        if field.type != descriptor.FieldDescriptor.TYPE_BYTES:
            continue
        for key in (field.name, field.json_name):
            encoded = value.get(key)
            if isinstance(encoded, str) and not valid_base64(encoded):
                raise _invalid(f"{field.name} is not base64: {encoded[:40]!r}")
    try:
        json_format.ParseDict(value, message)
    except json_format.ParseError as exc:
        raise _invalid(f"request body: {exc}") from None


def _parse_query(request: web.Request, route: Route, message: Message) -> None:
    """grpc-gateway's query parameters: each name a field path of the request (proto or JSON
    names, dotted into messages), each value the field's proto3 JSON text (numbers, enum
    names, RFC 3339 timestamps); a name that is no field, or a field given twice, is 400."""
    raw_query = request.raw_path.partition("?")[2]
    try:
        pairs = urllib.parse.parse_qsl(
            raw_query, keep_blank_values=True, strict_parsing=False, errors="strict"
        )
    except UnicodeDecodeError:
        raise _invalid("the query string must be valid UTF-8 (percent-decoded)") from None
    tree: dict[str, Any] = {}
    for name, value in pairs:
        node, fields = tree, route.query_fields
        parts = name.split(".")
        for depth, part in enumerate(parts):
            field = next((f for f in fields if part in (f.name, f.json_name)), None)
            if field is None:
                raise _invalid(f"query parameter {name!r} is not a field of the request")
            last = depth == len(parts) - 1
            is_message = field.message_type is not None and not _is_well_known(field)
            if last == is_message or field.is_repeated:
                raise _invalid(f"query parameter {name!r} does not name a single value")
            if last:
                if field.name in node:
                    raise _invalid(f"query parameter {name!r} is given twice")
                node[field.name] = _query_value(field, value)
            else:
                child = node.setdefault(field.name, {})
                if not isinstance(child, dict):  # "filter=x" and then "filter.nodeId=y"
                    raise _invalid(f"query parameter {name!r} does not name a field")
                node, fields = child, tuple(field.message_type.fields)
    try:
        json_format.ParseDict(tree, message)
    except json_format.ParseError as exc:
        raise _invalid(f"query string: {exc}") from None


def _is_well_known(field: descriptor.FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.full_name.startswith(
        "google.protobuf."
    )


def _query_value(field: descriptor.FieldDescriptor, value: str) -> Any:
    if field.type == descriptor.FieldDescriptor.TYPE_BOOL:
        return {"true": True, "false": False}.get(value, value)
    return value


def valid_base64(text: str) -> bool:
    if not _BASE64.match(text) or len(text.rstrip("=")) % 4 == 1:
        return False
    try:
        base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return False
    return True
