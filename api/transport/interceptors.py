"""Server interceptors, outermost first: metrics (sees every outcome, rejections included),
bearer-token authentication, then the cap on concurrent calls (so unauthenticated callers
cannot take slots). Authentication and the cap apply to ConnectionService only: health checks
and reflection stay open so that probes and grpcurl work, and keep working under load."""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from conntrack.api.transport.auth import BearerTokens
from conntrack.api.transport.metrics import ApiMetrics

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
if TYPE_CHECKING:
    # The stubs make these generic; at run time they are not subscriptable.
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Interceptor = grpc.aio.ServerInterceptor
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]


def _unary(handler: Handler | None) -> Behavior | None:
    if handler is None or handler.unary_unary is None:
        return None
    behavior: Behavior = handler.unary_unary  # type: ignore[assignment]
    return behavior


def _replace(handler: Handler, behavior: Behavior) -> Handler:
    # grpc's RpcMethodHandler implementation is a namedtuple.
    replaced: Handler = handler._replace(unary_unary=behavior)  # type: ignore[attr-defined]
    return replaced


class _WrappedHandlers:
    """Each method's wrapped handler, built on its first call and reused: the server looks the
    same handler up for every call of a method, so wrapping it anew per call would only
    allocate. Bounded by the number of registered methods (unknown methods have no handler)."""

    def __init__(self, wrap: Callable[[str, Behavior], Behavior]) -> None:
        self._wrap = wrap
        self._by_method: dict[str, tuple[Handler, Handler]] = {}

    def get(self, method: str, handler: Handler, behavior: Behavior) -> Handler:
        cached = self._by_method.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _replace(handler, self._wrap(method, behavior))
        self._by_method[method] = (handler, wrapped)
        return wrapped


def _deadline_passed(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class _WrappingInterceptor(Interceptor):
    """Wraps the unary handlers of the methods under `prefix` with `wrap(method, behavior)`;
    `wrap` is also what another transport (api/transport/rest.py) calls to get the same
    behaviour."""

    def __init__(self, prefix: str | tuple[str, ...]) -> None:
        self._prefix = prefix
        self._handlers = _WrappedHandlers(self.wrap)

    @abc.abstractmethod
    def wrap(self, method: str, behavior: Behavior) -> Behavior: ...

    async def intercept_service(  # type: ignore[override]
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        behavior = _unary(handler)
        if (
            handler is None
            or behavior is None
            or not handler_call_details.method.startswith(self._prefix)
        ):
            return handler
        return self._handlers.get(handler_call_details.method, handler, behavior)


class MetricsInterceptor(_WrappingInterceptor):
    """Counts the calls of the methods under `counted_prefix` (ConnectionService: health checks
    and reflection are not traffic) and makes a call that ended before it could be answered
    (the caller's deadline passed, or the caller went away) end as a cancellation. Outermost,
    so it sees every outcome, rejections included."""

    def __init__(self, metrics: ApiMetrics, counted_prefix: str | tuple[str, ...]) -> None:
        super().__init__(counted_prefix)
        self._metrics = metrics

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        """behavior counted as `method` (also for api/transport/rest.py, whose calls go through the
        same service code with a context of its own)."""
        metrics = self._metrics

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            handling = metrics.call_started(method)
            started = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await behavior(request, context)
                if _deadline_passed(context):
                    # Too late to answer: gRPC ends the call with DEADLINE_EXCEEDED itself, and
                    # an answer sent meanwhile would fail (which grpc logs as an error).
                    raise asyncio.CancelledError
                code = context.code() or grpc.StatusCode.OK
                return response
            except asyncio.CancelledError:
                # grpc cancels the handler when the caller goes away or its deadline passes.
                code = _ended_early(context)
                raise
            except grpc.aio.InternalError as exc:
                # A status (context.abort) could not be sent: the call had already ended, its
                # deadline passing or its caller leaving while the answer was being made.
                # That is a cancellation, not a failure of this server.
                code = _ended_early(context)
                log.debug("%s ended before its status could be sent: %s", method, exc)
                raise asyncio.CancelledError from None
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                metrics.call_handled(method, code, time.perf_counter() - started, handling)

        return observed


def _ended_early(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    return (
        grpc.StatusCode.DEADLINE_EXCEEDED
        if _deadline_passed(context)
        else grpc.StatusCode.CANCELLED
    )


class BearerAuthInterceptor(Interceptor):
    def __init__(self, tokens: BearerTokens, protected_prefix: str | tuple[str, ...]) -> None:
        self._tokens = tokens
        self._prefix = protected_prefix

    async def intercept_service(  # type: ignore[override]
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        if self._accepts(handler_call_details.method, handler_call_details.invocation_metadata):
            return handler
        return _replace(handler, _reject_unauthenticated)

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        """behavior behind the same check, made on each call's context.invocation_metadata():
        for a transport other than gRPC (api/transport/rest.py)."""

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not self._accepts(method, context.invocation_metadata()):
                await _reject_unauthenticated(request, context)
            return await behavior(request, context)

        return guarded

    def _accepts(self, method: str, metadata: Any) -> bool:
        if self._tokens.accepts(metadata):
            return True
        # Never log the metadata: it may hold a (wrong but real) credential.
        log.info("rejected %s: missing or invalid bearer token", method)
        return False


async def _reject_unauthenticated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'",
    )


class ConcurrencyLimitInterceptor(_WrappingInterceptor):
    """At most `limit` protected calls at a time; beyond that RESOURCE_EXHAUSTED at once, so
    overload sheds calls instead of queueing them until everything times out."""

    def __init__(
        self,
        limit: int,
        protected_prefix: str | tuple[str, ...],
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(protected_prefix)
        self.limit = limit
        self._on_change = on_change
        self.in_flight = 0

    def _set(self, value: int) -> None:
        self.in_flight = value
        if self._on_change is not None:
            self._on_change(value)

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        """behavior under this cap (api/transport/rest.py's calls share its slots with gRPC
        calls)."""

        async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            # One event loop serves every call, so check-and-increment cannot race.
            if self.in_flight >= self.limit:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many concurrent calls (limit {self.limit}); retry with backoff",
                )
            self._set(self.in_flight + 1)
            try:
                return await behavior(request, context)
            finally:
                self._set(self.in_flight - 1)

        return limited
