"""Wire compatibility with a real client: the official Yandex Cloud Python SDK (`yandexcloud`,
in its own virtualenv because it pins protobuf below 7) calls our server through its own
generated stubs, and every field it decodes is checked; its Send and Disconnect reach a real
WebSocket client through a gateway node."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedOK

from conntrack.api.application.freshness import POSITION_HEADER, parse_positions
from conntrack.api.read.repository import ConnectionRepository, create_read_engine
from conntrack.api.transport.auth import BearerTokens
from conntrack.api.transport.server import ApiServer
from conntrack.core.schema import connections, projection_offsets
from conntrack.core.settings import Settings
from tests.support.gateway import (
    gateway_node,
    own_id,
    projector_and_api,
    verified,
    wait_for_get,
    with_command_topics,
)
from tests.support.kafka import unique

REPO = Path(__file__).resolve().parents[2]
CONNECTED_NS = 1_764_300_000_123_456_789
ACTIVE_NS = 1_764_300_065_000_000_007
TOKEN = "compat-token-5b9e2d7c1a3f"

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["postgres", "sqlite"])]


@pytest.fixture(scope="session")
def sdk_python() -> Path:
    """The SDK virtualenv's python, created on first use and cached under .local/sdk-venv."""
    try:
        result = subprocess.run(
            [str(REPO / "scripts" / "sdk-venv.sh")],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"cannot create the SDK virtualenv (needs PyPI access):\n{exc.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture
async def read_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_read_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(
            insert(connections).values(
                connection_id="conn-sdk-0001",
                gateway_id="d5dq0cs1a8c1ub2f3bnh",
                source_ip="203.0.113.77",
                user_agent="Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1.15 ✓",
                connected_at_ns=CONNECTED_NS,
                last_active_at_ns=ACTIVE_NS,
            )
        )
        await conn.execute(
            insert(projection_offsets).values(topic="events-sdk", partition=0, next_offset=42)
        )
    yield engine
    await engine.dispose()


async def test_official_sdk_stubs_read_every_field(
    sdk_python: Path, read_engine: AsyncEngine
) -> None:
    async with ApiServer(
        ConnectionRepository(read_engine), "127.0.0.1:0", tokens=BearerTokens([TOKEN])
    ) as server:
        process = await asyncio.create_subprocess_exec(
            str(sdk_python),
            str(REPO / "tests" / "compat" / "sdk_client.py"),
            f"127.0.0.1:{server.port}",
            "conn-sdk-0001",
            TOKEN,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",  # nothing of this project on the client's path
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    seen = json.loads(out)

    # The client really is the SDK's generated code, under upstream's file names.
    assert "/site-packages/yandex/cloud/serverless/apigateway/websocket/v1/" in seen["stub_module"]
    assert (
        seen["proto_file"]
        == "yandex/cloud/serverless/apigateway/websocket/v1/connection_service.proto"
    )
    assert seen["response_type"] == "yandex.cloud.serverless.apigateway.websocket.v1.Connection"

    assert seen["id"] == "conn-sdk-0001"
    assert seen["gateway_id"] == "d5dq0cs1a8c1ub2f3bnh"
    assert seen["has_identity"] is True
    assert seen["source_ip"] == "203.0.113.77"
    assert seen["user_agent"] == "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1.15 ✓"
    assert seen["connected_at"] == list(divmod(CONNECTED_NS, 1_000_000_000))
    assert seen["last_active_at"] == list(divmod(ACTIVE_NS, 1_000_000_000))
    assert seen["unknown_fields"] == 0
    assert parse_positions(seen["trailing_metadata"][POSITION_HEADER]) == {("events-sdk", 0): 42}

    # A server without a command channel: the SDK's Send and Disconnect reach it and get its
    # answer (tests/integration/test_send.py delivers them through a node).
    assert seen["send"]["code"] == "UNIMPLEMENTED"
    assert "no command channel" in seen["send"]["details"]
    assert seen["disconnect"]["code"] == "UNIMPLEMENTED"
    assert "no command channel" in seen["disconnect"]["details"]
    assert seen["get_without_token"]["code"] == "UNAUTHENTICATED"


async def run_sdk_client(sdk_python: Path, *args: str) -> dict[str, object]:
    process = await asyncio.create_subprocess_exec(
        str(sdk_python),
        str(REPO / "tests" / "compat" / "sdk_client.py"),
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",  # nothing of this project on the client's path
    )
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode == 0, err.decode()
    seen: dict[str, object] = json.loads(out)
    return seen


@pytest.mark.kafka
async def test_official_sdk_stubs_send_and_disconnect_through_a_gateway_node(
    sdk_python: Path, kafka_settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    text = "from the SDK ✓"
    binary = bytes(range(256))
    async with (
        with_command_topics(kafka_settings) as settings,
        projector_and_api(settings, engine) as system,
        gateway_node(settings, unique("gw-node"), tmp_path / "gateway.log") as gateway,
    ):
        async with connect(gateway.url) as client:
            connection_id = own_id(client)
            await wait_for_get(system.stub, connection_id, "OK")
            seen = await run_sdk_client(
                sdk_python,
                "--deliver",
                f"127.0.0.1:{system.server.port}",
                connection_id,
                text,
                binary.hex(),
            )
            assert "/site-packages/yandex/cloud/serverless/apigateway/websocket/v1/" in str(
                seen["stub_module"]
            )
            assert seen["send_text"] == {"code": "OK", "details": ""}
            assert seen["send_binary"] == {"code": "OK", "details": ""}
            assert seen["disconnect"] == {"code": "OK", "details": ""}
            after = seen["send_after_disconnect"]
            assert isinstance(after, dict)
            assert after["code"] == "NOT_FOUND"
            # The client got both frames, byte for byte and in order, then the close (1000).
            assert await asyncio.wait_for(client.recv(), 30) == text
            assert await asyncio.wait_for(client.recv(), 30) == binary
            with pytest.raises(ConnectionClosedOK):
                await asyncio.wait_for(client.recv(), 30)
            assert client.close_code == 1000
        await wait_for_get(system.stub, connection_id, "NOT_FOUND", lambda d: "disconnected" in d)
        assert await gateway.terminate() == 0
        result = await verified(settings, engine, system.store)
        assert result.ok, (result.differences, result.node_differences)
