"""What every call of the API's services goes through, on either transport, outermost first:
metrics (sees every outcome, rejections included), bearer-token authentication, then the cap
on concurrent calls (so unauthenticated callers cannot take slots). Each wraps a Behavior and
returns one; api/transport/server.py composes them once per method for gRPC and for the REST
mapping alike. Health checks and reflection are not wrapped: probes and grpcurl keep working
without tokens and under load."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from conntrack.api.application.call import ApiError, Behavior, Call
from conntrack.api.transport.auth import BearerTokens
from conntrack.api.transport.metrics import ApiMetrics

log = logging.getLogger(__name__)

Wrap = Callable[[str, Behavior], Behavior]

_UNAUTHENTICATED = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"


def _deadline_passed(call: Call) -> bool:
    remaining = call.time_remaining()
    return remaining is not None and remaining <= 0


def _ended_early(call: Call) -> grpc.StatusCode:
    return (
        grpc.StatusCode.DEADLINE_EXCEEDED if _deadline_passed(call) else grpc.StatusCode.CANCELLED
    )


def metered(metrics: ApiMetrics) -> Wrap:
    """Counts each call as `method` with its outcome, and makes a call that ended before it
    could be answered (the caller's deadline passed, or the caller went away) end as a
    cancellation."""

    def wrap(method: str, behavior: Behavior) -> Behavior:
        async def observed(request: object, call: Call) -> object:
            handling = metrics.call_started(method)
            started = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await behavior(request, call)
                if _deadline_passed(call):
                    # Too late to answer: gRPC ends the call with DEADLINE_EXCEEDED itself, and
                    # an answer sent meanwhile would fail (which grpc logs as an error).
                    raise asyncio.CancelledError
                code = grpc.StatusCode.OK
                return response
            except ApiError as exc:
                code = exc.code
                raise
            except asyncio.CancelledError:
                # grpc cancels the handler when the caller goes away or its deadline passes.
                code = _ended_early(call)
                raise
            finally:
                metrics.call_handled(method, code, time.perf_counter() - started, handling)

        return observed

    return wrap


def authenticated(tokens: BearerTokens) -> Wrap:
    """UNAUTHENTICATED unless the call carries one of `tokens` (`authorization: Bearer ...`)."""

    def wrap(method: str, behavior: Behavior) -> Behavior:
        async def guarded(request: object, call: Call) -> object:
            if not tokens.accepts(call.invocation_metadata()):
                # Never log the metadata: it may hold a (wrong but real) credential.
                log.info("rejected %s: missing or invalid bearer token", method)
                raise ApiError(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
            return await behavior(request, call)

        return guarded

    return wrap


class CallLimit:
    """At most `limit` calls at a time, gRPC's and REST's together; beyond that
    RESOURCE_EXHAUSTED at once, so overload sheds calls instead of queueing them until
    everything times out."""

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self._on_change = on_change
        self.in_flight = 0

    def _set(self, value: int) -> None:
        self.in_flight = value
        if self._on_change is not None:
            self._on_change(value)

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        async def limited(request: object, call: Call) -> object:
            # One event loop serves every call, so check-and-increment cannot race.
            if self.in_flight >= self.limit:
                raise ApiError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many concurrent calls (limit {self.limit}); retry with backoff",
                )
            self._set(self.in_flight + 1)
            try:
                return await behavior(request, call)
            finally:
                self._set(self.in_flight - 1)

        return limited


def composed(*wraps: Wrap) -> Wrap:
    """The wraps applied outermost first."""

    def wrap(method: str, behavior: Behavior) -> Behavior:
        for inner in reversed(wraps):
            behavior = inner(method, behavior)
        return behavior

    return wrap
