"""The REST mapping of ConnectionService (upstream's `google.api.http` routes) and of the
project's ConnectionDirectoryService (its own routes), read from the .protos' annotations (the
one description of them), served over HTTP/1.1 + JSON by aiohttp on the gRPC server's event
loop. docs/api.md, "The REST mapping", is the contract.

Every call goes through the same service code as a gRPC call (api/application/service.py:
validation, freshness, liveness, commands), behind the same wrappers (api/transport/wrappers.py:
metrics, bearer tokens, the shared cap on concurrent calls), on an HttpCall (the request's
headers, its grpc-timeout deadline, the trailing metadata the answer carries as headers); an
ApiError becomes the HTTP answer. Messages are read and written in the proto3 JSON mapping
(google.protobuf.json_format); a GET's other request fields come from the query string, as
grpc-gateway reads them (`filter.nodeId=...`, proto or JSON names). Errors are grpc-gateway's
status JSON, `{"code": <gRPC code>, "message": "...", "details": []}`, on the conventional HTTP
status."""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import json
import logging
import re
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
from aiohttp import web
from google.api import annotations_pb2
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from conntrack.api.application.call import ApiError, Behavior, Call
from conntrack.api.application.directory import DIRECTORY_SERVICE
from conntrack.api.application.service import SERVICE
from conntrack.api.transport.wrappers import Wrap

log = logging.getLogger(__name__)

OPENAPI_PATH: Final = "/openapi.json"

# grpc-gateway's runtime.HTTPStatusFromCode: the conventional HTTP status of each gRPC code.
HTTP_STATUS: Final[Mapping[grpc.StatusCode, int]] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

# The gRPC code of an answer aiohttp gives before any route's handler runs.
_CODE_OF_HTTP_ERROR: Final[Mapping[int, grpc.StatusCode]] = {
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

_VARIABLE = re.compile(r"\{([^{}=]+)(=[^{}]*)?\}")
_TIMEOUT = re.compile(r"^([0-9]{1,8})([HMSmun])$")
_TIMEOUT_UNIT_S: Final = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# proto3 JSON bytes: standard or URL-safe base64, padded or not (python's decoder would drop
# characters outside the alphabet silently).
_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")


@dataclass(frozen=True, slots=True)
class Route:
    """One `google.api.http` rule of a ConnectionService or ConnectionDirectoryService method."""

    service: str  # the service's full name
    rpc: str  # the method's name: Get, Send, Disconnect, ListConnections, ...
    http_method: str  # GET, POST, DELETE
    path: str  # aiohttp's (and OpenAPI's) template: variables named by their JSON names
    path_fields: tuple[str, ...]  # the request fields the path sets (proto names)
    body: str  # the rule's body: "" (none) or "*" (the whole request)
    request_type: type[Message]
    response_type: type[Message]

    @property
    def full_method(self) -> str:
        return f"/{self.service}/{self.rpc}"

    @property
    def query_fields(self) -> tuple[Any, ...]:
        """The request's fields a GET or DELETE takes from the query string: those not in the
        path (with a body "*" every other field is in the body)."""
        if self.body == "*":
            return ()
        fields = self.request_type.DESCRIPTOR.fields
        return tuple(f for f in fields if f.name not in self.path_fields)

    @property
    def path_suffix(self) -> str:
        """What the template has after its last variable (":send"), matched literally."""
        return _VARIABLE.split(self.path)[-1] if _VARIABLE.search(self.path) else ""


def _route(method: descriptor.MethodDescriptor) -> Route:
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    kind = rule.WhichOneof("pattern")
    if kind is None or kind == "custom":
        raise ValueError(f"{method.full_name}: no google.api.http route this mapping serves")
    template: str = getattr(rule, kind)
    request = method.input_type
    fields: list[str] = []

    def json_variable(match: re.Match[str]) -> str:
        name, pattern = match.group(1), match.group(2)
        field = request.fields_by_name.get(name)
        # Only {field} of a top-level string field: all upstream uses, and all this serves.
        if pattern or field is None or field.type != descriptor.FieldDescriptor.TYPE_STRING:
            raise ValueError(f"{method.full_name}: unsupported path variable {match.group(0)}")
        fields.append(name)
        return "{" + field.json_name + "}"

    path = _VARIABLE.sub(json_variable, template)
    if rule.body not in ("", "*") or rule.additional_bindings:
        raise ValueError(f"{method.full_name}: unsupported google.api.http body or bindings")
    return Route(
        service=method.containing_service.full_name,
        rpc=method.name,
        http_method=kind.upper(),
        path=path,
        path_fields=tuple(fields),
        body=rule.body,
        request_type=GetMessageClass(request),
        response_type=GetMessageClass(method.output_type),
    )


# Read once from the descriptors: an annotation this module cannot serve fails at import.
ROUTES: Final = tuple(_route(m) for s in (SERVICE, DIRECTORY_SERVICE) for m in s.methods)


def grpc_timeout_seconds(value: str) -> float:
    """A `grpc-timeout` header (gRPC over HTTP/2's format, which grpc-gateway reads as the
    call's deadline): 1 to 8 digits and a unit, H M S m u n. ValueError otherwise."""
    match = _TIMEOUT.match(value.strip())
    if match is None:
        raise ValueError(f"grpc-timeout {value!r}: expected 1-8 digits and one of H M S m u n")
    return int(match.group(1)) * _TIMEOUT_UNIT_S[match.group(2)]


class RestAbort(ApiError):
    """An ApiError with an HTTP status other than the code's conventional one (413 for a body
    over the limit)."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int) -> None:
        super().__init__(code, message)
        self.http_status = http_status


class HttpCall:
    """A Call over one HTTP request: its headers as invocation metadata, its deadline (from
    grpc-timeout), and the trailing metadata the answer carries as headers."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], deadline: float | None) -> None:
        self._metadata = metadata
        self._deadline = deadline  # time.monotonic() when the caller's deadline passes
        self.trailing: tuple[tuple[str, str], ...] = ()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return self._metadata

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.trailing = tuple((str(k), str(v)) for k, v in metadata)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """What a REST handler passes down the wrapped behaviors: the request message is made from
    it innermost, after authentication and the concurrency cap, as gRPC decodes a message."""

    request: web.Request
    route: Route


def _status_json(code: grpc.StatusCode, message: str) -> dict[str, Any]:
    return {"code": code.value[0], "message": message, "details": []}


def error_response(
    code: grpc.StatusCode,
    message: str,
    http_status: int | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> web.Response:
    response = web.json_response(
        _status_json(code, message),
        status=http_status if http_status is not None else HTTP_STATUS[code],
    )
    for key, value in headers:
        response.headers[key] = value
    if code is grpc.StatusCode.UNAUTHENTICATED:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


async def _request_message(http: HttpRequest) -> Message:
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
            if isinstance(encoded, str) and not _valid_base64(encoded):
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


def _valid_base64(text: str) -> bool:
    if not _BASE64.match(text) or len(text.rstrip("=")) % 4 == 1:
        return False
    try:
        base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return False
    return True


MAX_BODY_KEY: Final = web.AppKey("max_body_bytes", int)


def _innermost(method: Behavior) -> Behavior:
    async def made(http: HttpRequest, call: Call) -> Message:
        answer: Message = await method(await _request_message(http), call)
        return answer

    return made


def _handler(route: Route, behavior: Behavior) -> Callable[[web.Request], Awaitable[web.Response]]:
    suffix = route.path_suffix

    async def handle(request: web.Request) -> web.Response:
        if suffix and not request.raw_path.partition("?")[0].endswith(suffix):
            # aiohttp matched a percent-encoded ":send"; upstream's routing (grpc-gateway's)
            # matches the verb as written, so this is the plain resource, which takes no POST.
            raise web.HTTPMethodNotAllowed(request.method, _methods_of_plain_resource(route))
        deadline = None
        timeout_header = request.headers.get("grpc-timeout")
        if timeout_header is not None:
            try:
                deadline = time.monotonic() + grpc_timeout_seconds(timeout_header)
            except ValueError as exc:
                return error_response(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        call = HttpCall(
            tuple((key.lower(), value) for key, value in request.headers.items()), deadline
        )
        try:
            if deadline is None:
                answer = await behavior(HttpRequest(request, route), call)
            else:
                async with asyncio.timeout(deadline - time.monotonic()):
                    answer = await behavior(HttpRequest(request, route), call)
        except ApiError as exc:
            http_status = exc.http_status if isinstance(exc, RestAbort) else None
            return error_response(exc.code, exc.message, http_status, call.trailing)
        except TimeoutError:
            return error_response(
                grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", None, call.trailing
            )
        response = web.json_response(
            json_format.MessageToDict(answer, always_print_fields_with_no_presence=True)
        )
        for key, value in call.trailing:
            response.headers[key] = value
        return response

    return handle


def _methods_of_plain_resource(route: Route) -> list[str]:
    plain = route.path.removesuffix(route.path_suffix)
    return [r.http_method for r in ROUTES if r.path == plain]


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own answers (no such route, method not allowed) and unexpected failures as the
    same status JSON as every other error."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _CODE_OF_HTTP_ERROR.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
        response = error_response(code, exc.reason, exc.status)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("REST %s %s failed", request.method, request.rel_url.path)
        return error_response(grpc.StatusCode.INTERNAL, "internal error")


def build_app(
    services: Mapping[str, Any],
    wrap: Wrap,
    *,
    max_body_bytes: int,
    openapi: Mapping[str, Any],
) -> web.Application:
    """The application: each of ROUTES calling the method of the same name of its service's
    servicer (`services`, by the service's full name) through `wrap` (metrics, authentication,
    the concurrency cap), and the OpenAPI document."""
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_json_errors])
    app[MAX_BODY_KEY] = max_body_bytes
    for route in ROUTES:
        method = getattr(services[route.service], route.rpc)
        behavior = wrap(route.full_method, _innermost(method))
        app.router.add_route(route.http_method, route.path, _handler(route, behavior))
    document = json.dumps(openapi, indent=2)

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(text=document, content_type="application/json")

    app.router.add_route("GET", OPENAPI_PATH, openapi_json)
    return app


class RestSite:
    """The HTTP listener of the REST mapping; start() and stop() are idempotent. stop() lets
    in-flight calls finish within grace_seconds."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
        grace_seconds: float = 10.0,
    ) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._reuse_port = reuse_port
        self._grace = grace_seconds
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def app(self) -> web.Application:
        return self._app

    async def start(self) -> None:
        if self._runner is not None:
            return
        # No access log: gRPC calls are not logged one by one either; metrics count them.
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=self._grace)
        await runner.setup()
        site = web.TCPSite(
            runner,
            self._host or None,
            self._port,
            ssl_context=self._ssl,
            reuse_port=self._reuse_port or None,
        )
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            why = "address in use?" if exc.errno == errno.EADDRINUSE else exc.strerror or exc
            raise OSError(f"cannot listen on {self._host}:{self._port} for REST ({why})") from exc
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
