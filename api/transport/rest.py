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
import errno
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from conntrack.api.application.call import ApiError, Behavior, Call
from conntrack.api.transport.rest_requests import (
    MAX_BODY_KEY,
    HttpRequest,
    RestAbort,
    request_message,
)
from conntrack.api.transport.rest_routes import ROUTES, Route
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

_TIMEOUT = re.compile(r"^([0-9]{1,8})([HMSmun])$")
_TIMEOUT_UNIT_S: Final = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def grpc_timeout_seconds(value: str) -> float:
    """A `grpc-timeout` header (gRPC over HTTP/2's format, which grpc-gateway reads as the
    call's deadline): 1 to 8 digits and a unit, H M S m u n. ValueError otherwise."""
    match = _TIMEOUT.match(value.strip())
    if match is None:
        raise ValueError(f"grpc-timeout {value!r}: expected 1-8 digits and one of H M S m u n")
    return int(match.group(1)) * _TIMEOUT_UNIT_S[match.group(2)]


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


def _innermost(method: Behavior) -> Behavior:
    async def made(http: HttpRequest, call: Call) -> Message:
        answer: Message = await method(await request_message(http), call)
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
