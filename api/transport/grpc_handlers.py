"""The gRPC side of the services: each method registered with a request parser that turns an
undecodable body into INVALID_ARGUMENT (grpcio would answer UNKNOWN), run through the wraps
(api/transport/wrappers.py) on a Call over gRPC's servicer context, and an ApiError sent as the
call's status."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from conntrack.api.application.call import ApiError, Behavior, UndecodableRequest
from conntrack.api.transport.wrappers import Wrap

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Context = grpc.aio.ServicerContext[Any, Any]


class GrpcCall:
    """A Call over a gRPC servicer context."""

    __slots__ = ("_context",)

    def __init__(self, context: Context) -> None:
        self._context = context

    def time_remaining(self) -> float | None:
        remaining: float | None = self._context.time_remaining()
        return remaining

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return tuple(self._context.invocation_metadata() or ())

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._context.set_trailing_metadata(tuple(metadata))


def tolerant_parser(message_type: type[M]) -> Callable[[bytes], M | UndecodableRequest]:
    def parse(data: bytes) -> M | UndecodableRequest:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return UndecodableRequest(message_type.DESCRIPTOR.name, str(exc))

    return parse


def _on_grpc(behavior: Behavior) -> Callable[[Any, Context], Awaitable[Any]]:
    async def handle(request: Any, context: Context) -> Any:
        try:
            return await behavior(request, GrpcCall(context))
        except ApiError as exc:
            try:
                await context.abort(exc.code, exc.message)
            except grpc.aio.InternalError as err:
                # The status could not be sent: the call had already ended (its deadline passed
                # or its caller left while the answer was being made). A cancellation, not a
                # failure of this server.
                log.debug("a call ended before its status could be sent: %s", err)
                raise asyncio.CancelledError from None

    return handle


def handlers(
    servicer: object, service: ServiceDescriptor, wrap: Wrap
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The method handlers of one service, as its generated add_*Servicer_to_server registers
    them (the servicer's method of each RPC's name), each behind `wrap`."""
    return {
        method.name: grpc.unary_unary_rpc_method_handler(
            _on_grpc(wrap(f"/{service.full_name}/{method.name}", getattr(servicer, method.name))),
            request_deserializer=tolerant_parser(GetMessageClass(method.input_type)),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
        for method in service.methods
    }
