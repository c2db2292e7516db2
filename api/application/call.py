"""What the application needs of a call, whatever carries it (gRPC or the REST mapping), and
how a call ends with a status other than OK. The services take a Call and raise ApiError; each
transport adapts its own call objects to Call and turns ApiError into its answer (a gRPC status,
or an HTTP status with grpc-gateway's JSON). The status codes are gRPC's: they are the API's
contract on both transports."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

Metadata = Sequence[tuple[str, str]]


class ApiError(Exception):
    """The call's answer is this status and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Call(Protocol):
    def time_remaining(self) -> float | None:
        """Seconds until the caller's deadline (None: no deadline)."""
        ...

    def invocation_metadata(self) -> Metadata:
        """What the caller sent with the call (gRPC metadata, or the HTTP headers)."""
        ...

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        """What goes back with the answer, whatever its status (the freshness header)."""
        ...


# A method of a service: (request, call) -> response.
Behavior = Callable[[Any, Call], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class UndecodableRequest:
    """A request body that is not a valid message of the method's request type (e.g. a string
    field holding invalid UTF-8). grpcio would answer UNKNOWN for it; the services answer
    INVALID_ARGUMENT."""

    message_type: str
    reason: str


def reject_undecodable(request: UndecodableRequest, what: str) -> ApiError:
    """INVALID_ARGUMENT for a request that could not be decoded; `what` names the rule."""
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request is not a valid {request.message_type} ({what}): {request.reason}",
    )


# How much of the caller's deadline a call that waits for gateway nodes leaves for its own
# answer.
DEADLINE_MARGIN_S = 0.25


def wait_budget(call: Call, configured_s: float) -> float:
    """How long a call may wait for gateway nodes: `configured_s`, but ending a little before
    the caller's deadline, so the answer is ours (UNAVAILABLE, or an incomplete outcome) and
    not a race with gRPC's DEADLINE_EXCEEDED. When too little is left, what is left (gRPC's
    deadline then ends the call first)."""
    remaining = call.time_remaining()
    timeout = configured_s
    if remaining is not None:
        timeout = min(timeout, remaining - DEADLINE_MARGIN_S)
    if timeout <= 0:
        timeout = max(remaining or 0.0, 0.001)
    return timeout
