"""Runs INSIDE the SDK virtualenv (scripts/sdk-venv.sh), not under pytest: calls our server
through the official Yandex Cloud Python SDK's generated stubs and prints what it got as JSON
for tests/compat/test_sdk_compat.py to check field by field.

Usage: python sdk_client.py TARGET CONNECTION_ID [TOKEN]
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


def main() -> None:
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
