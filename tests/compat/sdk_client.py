"""Runs INSIDE the SDK virtualenv (scripts/sdk-venv.sh), not under pytest: calls our server
through the official Yandex Cloud Python SDK's generated stubs and prints what it got as JSON
for tests/compat/test_sdk_compat.py to check field by field.

Usage: python sdk_client.py TARGET CONNECTION_ID [TOKEN]
       python sdk_client.py --deliver TARGET CONNECTION_ID TEXT BINARY_HEX
The second form calls Send (TEXT, then BINARY), Disconnect and Send again against a server with
a command channel and a live gateway node, and prints each call's status.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import grpc
from google.protobuf.unknown_fields import UnknownFieldSet
from yandex.cloud.serverless.apigateway.websocket.v1 import (  # type: ignore[import-not-found]
    connection_service_pb2,
    connection_service_pb2_grpc,
)


def _status(call: Any) -> dict[str, Any]:
    try:
        call()
    except grpc.RpcError as exc:
        return {"code": exc.code().name, "details": exc.details()}
    return {"code": "OK", "details": ""}


def deliver(target: str, connection_id: str, text: str, binary: bytes) -> None:
    request = connection_service_pb2.SendToConnectionRequest
    with grpc.insecure_channel(target) as channel:
        stub = connection_service_pb2_grpc.ConnectionServiceStub(channel)

        def send(data: bytes, kind: Any) -> dict[str, Any]:
            return _status(
                lambda: stub.Send(
                    request(connection_id=connection_id, data=data, type=kind), timeout=30
                )
            )

        send_text = send(text.encode(), request.TEXT)
        send_binary = send(binary, request.BINARY)
        disconnect = _status(
            lambda: stub.Disconnect(
                connection_service_pb2.DisconnectRequest(connection_id=connection_id), timeout=30
            )
        )
        send_after = send(b"too late", request.TEXT)
    print(
        json.dumps(
            {
                "stub_module": connection_service_pb2_grpc.__file__,
                "send_text": send_text,
                "send_binary": send_binary,
                "disconnect": disconnect,
                "send_after_disconnect": send_after,
            }
        )
    )


def main() -> None:
    if sys.argv[1] == "--deliver":
        deliver(sys.argv[2], sys.argv[3], sys.argv[4], bytes.fromhex(sys.argv[5]))
        return
    target, connection_id = sys.argv[1], sys.argv[2]
    metadata = (("authorization", f"Bearer {sys.argv[3]}"),) if len(sys.argv) > 3 else None
    with grpc.insecure_channel(target) as channel:
        stub = connection_service_pb2_grpc.ConnectionServiceStub(channel)
        answer, call = stub.Get.with_call(
            connection_service_pb2.GetConnectionRequest(connection_id=connection_id),
            timeout=10,
            metadata=metadata,
        )
        send = _status(
            lambda: stub.Send(
                connection_service_pb2.SendToConnectionRequest(
                    connection_id=connection_id,
                    data=b"hello",
                    type=connection_service_pb2.SendToConnectionRequest.TEXT,
                ),
                timeout=10,
                metadata=metadata,
            )
        )
        disconnect = _status(
            lambda: stub.Disconnect(
                connection_service_pb2.DisconnectRequest(connection_id=connection_id),
                timeout=10,
                metadata=metadata,
            )
        )
        unauthenticated = _status(
            lambda: stub.Get(
                connection_service_pb2.GetConnectionRequest(connection_id=connection_id),
                timeout=10,
            )
        )
    print(
        json.dumps(
            {
                "stub_module": connection_service_pb2_grpc.__file__,
                "proto_file": connection_service_pb2.DESCRIPTOR.name,
                "response_type": answer.DESCRIPTOR.full_name,
                "id": answer.id,
                "gateway_id": answer.gateway_id,
                "has_identity": answer.HasField("identity"),
                "source_ip": answer.identity.source_ip,
                "user_agent": answer.identity.user_agent,
                "connected_at": [answer.connected_at.seconds, answer.connected_at.nanos],
                "last_active_at": [answer.last_active_at.seconds, answer.last_active_at.nanos],
                # Fields the SDK's schema does not know would land here: none may.
                "unknown_fields": len(UnknownFieldSet(answer))
                + len(UnknownFieldSet(answer.identity)),
                "trailing_metadata": {k: v for k, v in call.trailing_metadata() or ()},
                "send": send,
                "disconnect": disconnect,
                "get_without_token": unauthenticated,
            }
        )
    )


if __name__ == "__main__":
    main()
