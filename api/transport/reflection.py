"""Server reflection under both names clients use: grpc.reflection.v1.ServerReflection (the
stable one, which grpcurl and other current tools try first) and
grpc.reflection.v1alpha.ServerReflection (which older clients know).

grpcio-reflection implements only v1alpha. The v1 protocol is the same protocol under another
package name: every message has the same fields with the same numbers, so v1 requests and
answers are read and written with the v1alpha message classes, served by the same servicer.
So that a client can also ask reflection to describe v1 itself, its descriptor (v1alpha's with
the package renamed) goes into the descriptor pool reflection answers from."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE_NAME: Final[str] = reflection.SERVICE_NAME
V1_PACKAGE: Final = "grpc.reflection.v1"
V1_SERVICE_NAME: Final = f"{V1_PACKAGE}.ServerReflection"
V1_FILE_NAME: Final = "grpc/reflection/v1/reflection.proto"
SERVICE_NAMES: Final = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: v1alpha's file with the package renamed."""
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old = f".{file.package}."
    file.name = V1_FILE_NAME
    file.package = V1_PACKAGE
    file.ClearField("options")  # v1alpha's language options name v1alpha packages

    def renamed(type_name: str) -> str:
        return (
            f".{V1_PACKAGE}.{type_name.removeprefix(old)}"
            if type_name.startswith(old)
            else type_name
        )

    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = renamed(field.type_name)
    for service in file.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    return file


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE_NAME)
    except KeyError:
        pool.AddSerializedFile(v1_file_descriptor().SerializeToString())


def enable_server_reflection(
    service_names: Iterable[str],
    server: grpc.aio.Server,
    pool: descriptor_pool.DescriptorPool | None = None,
) -> None:
    """Serve reflection for service_names (the reflection services themselves are added) under
    v1 and v1alpha; descriptors come from pool (the default pool if None)."""
    pool = pool or descriptor_pool.Default()
    _add_v1_descriptor(pool)
    # grpc-stubs do not know the asyncio servicer.
    servicer: Any = reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]
        (*service_names, *SERVICE_NAMES), pool=pool
    )
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in SERVICE_NAMES
        )
    )
