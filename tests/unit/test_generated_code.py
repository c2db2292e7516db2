"""The committed protobuf modules must be exactly what proto/generate.py produces now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_generated_code_lives_under_a_project_package() -> None:
    from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
        connection_service_pb2,
    )

    service = connection_service_pb2.DESCRIPTOR.services_by_name["ConnectionService"]
    assert service.full_name == "yandex.cloud.serverless.apigateway.websocket.v1.ConnectionService"
    assert connection_service_pb2.DESCRIPTOR.name == (
        "yandex/cloud/serverless/apigateway/websocket/v1/connection_service.proto"
    )
    assert connection_service_pb2.__name__.startswith("conntrack.core.protogen.")
