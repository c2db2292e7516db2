"""The whole system around real WebSocket clients: `conntrack-gateway` as a subprocess (a gateway
node), the projector and the API with a command channel in-process, fresh commands and outcomes
topics; polling the API with deadlines; checking that the read model is still the fold of the
log (verify)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection

from conntrack.api.application.commands import CommandChannel
from conntrack.api.read.repository import ConnectionRepository
from conntrack.api.transport.server import ApiServer
from conntrack.audit.log import LogReader
from conntrack.audit.replay import Verification, verify
from conntrack.core.liveness import Liveness
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.gateway.server import CONNECTION_ID_HEADER
from conntrack.projector.runner import Projector
from tests.support.kafka import create_topic, delete_topics, unique
from tests.support.projector import running, wait_caught_up

GATEWAY = Path(sys.executable).parent / "conntrack-gateway"
SECOND = 1_000_000_000


@contextlib.asynccontextmanager
async def with_command_topics(settings: Settings) -> AsyncIterator[Settings]:
    """The settings with a fresh commands topic (3 partitions) and outcomes topic."""
    bootstrap = settings.kafka_bootstrap_servers
    commands, outcomes = unique("commands"), unique("outcomes")
    await create_topic(bootstrap, commands, 3)
    await create_topic(bootstrap, outcomes, 1)
    try:
        yield settings.model_copy(
            update={"commands_topic": commands, "command_outcomes_topic": outcomes}
        )
    finally:
        await delete_topics(bootstrap, [commands, outcomes])


class GatewayProcess:
    """One `conntrack-gateway` subprocess (a gateway node) with the settings' broker, topics,
    delivery timeout and spool directory; stderr goes to a file."""

    def __init__(
        self,
        settings: Settings,
        node_id: str,
        log_path: Path,
        heartbeat_seconds: float = 0.2,
        env: dict[str, str] | None = None,
        argv: tuple[str, ...] = (str(GATEWAY),),
    ) -> None:
        self.node_id = node_id
        self._argv = argv
        self.log_path = log_path
        self.url = ""
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")}
        self._env.update(
            {
                "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
                "CONNTRACK_EVENTS_TOPIC": settings.events_topic,
                "CONNTRACK_COMMANDS_TOPIC": settings.commands_topic,
                "CONNTRACK_COMMAND_OUTCOMES_TOPIC": settings.command_outcomes_topic,
                "CONNTRACK_GATEWAY_NODE_ID": node_id,
                "CONNTRACK_GATEWAY_LISTEN": "127.0.0.1:0",
                "CONNTRACK_GATEWAY_HEARTBEAT_SECONDS": str(heartbeat_seconds),
                "CONNTRACK_GATEWAY_DELIVERY_TIMEOUT_SECONDS": str(
                    settings.gateway_delivery_timeout_seconds
                ),
            }
        )
        if settings.gateway_spool_dir is not None:
            self._env["CONNTRACK_GATEWAY_SPOOL_DIR"] = str(settings.gateway_spool_dir)
        self._env.update(env or {})
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, within: float = 90) -> str:
        """Start it and wait for its `listening on` line; returns its ws:// URL."""
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self._argv, env=self._env, stdout=asyncio.subprocess.PIPE, stderr=log
            )
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), within)
        except TimeoutError:
            raise AssertionError(f"the gateway did not start:\n{self.log()}") from None
        assert line.startswith(b"listening on ws://"), (line, self.log())
        self.url = line.split()[2].decode()
        return self.url

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), 30)

    async def terminate(self, within: float = 60) -> int:
        """SIGTERM and wait for the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), within)

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            await self.kill()


@contextlib.asynccontextmanager
async def gateway_node(
    settings: Settings,
    node_id: str,
    log_path: Path,
    heartbeat_seconds: float = 0.2,
    env: dict[str, str] | None = None,
) -> AsyncIterator[GatewayProcess]:
    gateway = GatewayProcess(settings, node_id, log_path, heartbeat_seconds, env)
    try:
        await gateway.start()
        yield gateway
    finally:
        await gateway.close()


# The reference gateway's trusted-header identity, with a `tier` label from a header: clients
# say who they are with X-Authenticated-User and X-Tier.
HEADER_IDENTITY = {
    "CONNTRACK_GATEWAY_AUTH": "header",
    "CONNTRACK_GATEWAY_LABELS": "tier=header:X-Tier",
}


async def header_identity_nodes(
    stack: contextlib.AsyncExitStack, settings: Settings, count: int, log_dir: Path
) -> list[GatewayProcess]:
    """`count` gateway nodes with HEADER_IDENTITY, stopped when `stack` closes."""
    return [
        await stack.enter_async_context(
            gateway_node(
                settings,
                unique(f"n{i}"),
                log_dir / f"n{i}-{unique('log')}.log",
                env=HEADER_IDENTITY,
            )
        )
        for i in range(count)
    ]


@dataclass
class System:
    store: ProjectionStore
    server: ApiServer
    channel: CommandChannel
    stub: svc_grpc.ConnectionServiceStub


@contextlib.asynccontextmanager
async def api_with_commands(
    settings: Settings, engine: AsyncEngine, *, lease_seconds: float = 30.0
) -> AsyncIterator[System]:
    """The API (with a command channel on the settings' topics) in-process, reading the nodes
    afresh for every call; yields once the channel is connected. The projector is the
    caller's (System.store is for reading the read model)."""
    channel = CommandChannel(
        settings.kafka_bootstrap_servers, settings.commands_topic, settings.command_outcomes_topic
    )
    async with (
        ApiServer(
            ConnectionRepository(engine),
            "127.0.0.1:0",
            freshness_ttl_seconds=0,
            liveness=Liveness.of_seconds(lease_seconds),
            commands=channel,
            command_timeout_seconds=20,
        ) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as grpc_channel,
    ):
        deadline = asyncio.get_running_loop().time() + 60
        while not channel.ready:
            assert asyncio.get_running_loop().time() < deadline, "command channel not ready"
            await asyncio.sleep(0.05)
        yield System(
            ProjectionStore(engine), server, channel, svc_grpc.ConnectionServiceStub(grpc_channel)
        )


@contextlib.asynccontextmanager
async def projector_and_api(
    settings: Settings, engine: AsyncEngine, *, lease_seconds: float = 30.0
) -> AsyncIterator[System]:
    """The projector and the API (api_with_commands) in-process."""
    async with (
        running(Projector(settings, ProjectionStore(engine))),
        api_with_commands(settings, engine, lease_seconds=lease_seconds) as system,
    ):
        yield system


def own_id(client: ClientConnection) -> str:
    """The connection id the gateway gave this client (handshake header X-Connection-Id)."""
    assert client.response is not None
    return client.response.headers[CONNECTION_ID_HEADER]


async def status_of(call: object) -> tuple[str, str]:
    """(status code name, details) of a unary gRPC call."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


async def get_status(stub: svc_grpc.ConnectionServiceStub, connection_id: str) -> tuple[str, str]:
    return await status_of(
        stub.Get(svc.GetConnectionRequest(connection_id=connection_id), timeout=30)
    )


async def wait_for_get(
    stub: svc_grpc.ConnectionServiceStub,
    connection_id: str,
    code: str,
    details: Callable[[str], bool] = lambda _: True,
    within: float = 60,
) -> tuple[str, str]:
    """Poll Get until it answers `code` with details the predicate accepts."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        answer = await get_status(stub, connection_id)
        if answer[0] == code and details(answer[1]):
            return answer
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"Get({connection_id!r}) still answers {answer}, not {code}")
        await asyncio.sleep(0.05)


def send_request(
    connection_id: str, data: bytes, kind: int = svc.SendToConnectionRequest.TEXT
) -> svc.SendToConnectionRequest:
    return svc.SendToConnectionRequest(connection_id=connection_id, data=data, type=kind)  # type: ignore[arg-type]


async def verified(settings: Settings, engine: AsyncEngine, store: ProjectionStore) -> Verification:
    """Once the projector has caught up with the log: verify (the fold of the log afresh
    against the read model)."""
    await wait_caught_up(store, settings)
    async with LogReader(settings.kafka_bootstrap_servers, settings.events_topic) as reader:
        return await verify(engine, reader)
