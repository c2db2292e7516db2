"""The API reading from PostgreSQL streaming replicas (api/read/replicas.py), on a private primary
with replicas made by infra/postgres.sh (pg_basebackup -R), and events projected from the real
broker into the primary. The shared PostgreSQL server is never touched: this module stops its
own primary and replicas."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from sqlalchemy.engine import make_url

from conntrack.api.application.freshness import POSITION_HEADER, parse_positions
from conntrack.core.database import create_engine
from conntrack.core.fold import ConnectionState, fold
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_pb2,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.core.timeutil import to_ns
from conntrack.migrations.cli import upgrade
from conntrack.projector.runner import Projector
from tests.support.api import SERVING, eventually, health_status, serve_api
from tests.support.events import as_records, make_events
from tests.support.kafka import publish
from tests.support.ports import free_port
from tests.support.projector import running, wait_caught_up

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

POSTGRES_SH = Path(__file__).resolve().parents[2] / "infra" / "postgres.sh"


@dataclass
class Servers:
    """A private primary and its replicas (infra/postgres.sh with its own ports and dirs)."""

    env: dict[str, str]
    primary_url: str
    replica_urls: list[str]
    replica_envs: list[dict[str, str]]

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            ["bash", str(POSTGRES_SH), *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, f"infra/postgres.sh {' '.join(args)}: {done.stderr}"
        return done.stdout.strip()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    # Not under pytest's tmp_path: the 'postgres' OS user must reach the data directories.
    base = Path(f"/tmp/conntrack-replica-test-{uuid.uuid4().hex[:8]}")
    port = free_port()
    env = {**os.environ, "CONNTRACK_PG_PORT": str(port), "CONNTRACK_PG_DIR": str(base / "p")}
    replica_envs = [
        {
            **env,
            "CONNTRACK_PG_REPLICA_PORT": str(free_port()),
            "CONNTRACK_PG_REPLICA_DIR": str(base / f"r{i}"),
        }
        for i in range(2)
    ]
    servers = Servers(env, "", [], replica_envs)
    try:
        servers.run("up")
        servers.primary_url = servers.run("url")
        for replica_env in replica_envs:
            servers.run("replica", "up", env=replica_env)
            servers.replica_urls.append(servers.run("replica", "url", env=replica_env))
        yield servers
    finally:
        for replica_env in replica_envs:
            subprocess.run(["bash", str(POSTGRES_SH), "replica", "reset"], env=replica_env)
        subprocess.run(["bash", str(POSTGRES_SH), "reset"], env=env)
        subprocess.run(["rm", "-rf", str(base)])


async def _connect(url: str) -> asyncpg.Connection:
    parsed = make_url(url)
    return await asyncpg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, database=parsed.database
    )


async def positions_of(url: str) -> dict[tuple[str, int], int]:
    conn = await _connect(url)
    try:
        rows = await conn.fetch("SELECT topic, partition, next_offset FROM projection_offsets")
        return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}
    finally:
        await conn.close()


async def api_sessions(url: str) -> int:
    conn = await _connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'conntrack-api'"
            )
        )
    finally:
        await conn.close()


async def project(settings: Settings, primary_url: str, n: int) -> dict[str, ConnectionState]:
    """n generated events published to the settings' topic and projected into the primary;
    the fold of what was published."""
    events = make_events(random.Random(n), uuid.uuid4().hex[:6], n, connections=n // 4)
    await publish(settings.kafka_bootstrap_servers, settings.events_topic, as_records(events))
    engine = create_engine(primary_url)
    try:
        store = ProjectionStore(engine)
        async with running(Projector(settings, store)):
            await wait_caught_up(store, settings)
    finally:
        await engine.dispose()
    return fold(events)


async def get(
    port: int, connection_id: str
) -> tuple[connection_pb2.Connection | None, dict[str, str]]:
    """The answer (None for NOT_FOUND) and the trailing metadata."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = svc_grpc.ConnectionServiceStub(channel).Get(
            svc.GetConnectionRequest(connection_id=connection_id), timeout=10
        )
        try:
            answer = await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            answer = None
        trailing = await call.trailing_metadata()
    return answer, {k: str(v) for k, v in trailing or ()}


def assert_answers(answer: connection_pb2.Connection | None, state: ConnectionState) -> None:
    if not state.is_open:
        assert answer is None, state
        return
    assert answer is not None, state
    assert answer.id == state.connection_id
    assert answer.gateway_id == state.gateway_id
    assert answer.identity.source_ip == state.source_ip
    assert answer.identity.user_agent == state.user_agent
    assert to_ns(answer.connected_at) == state.connected_at_ns
    assert to_ns(answer.last_active_at) == (state.last_active_at_ns or state.connected_at_ns)


@pytest.fixture
async def apis(tmp_path: Path) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for process in started:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)


def assert_clean_log(path: Path) -> None:
    text = path.read_text()
    assert "Traceback" not in text
    assert " ERROR " not in text


async def set_replay(url: str, paused: bool) -> None:
    conn = await _connect(url)
    try:
        await conn.execute(f"SELECT pg_wal_replay_{'pause' if paused else 'resume'}()")
    finally:
        await conn.close()


# Runs before the primary-crash test below (pytest keeps the file's order): it needs the primary.
async def test_failover_between_replicas_never_reports_a_position_the_row_may_not_reflect(
    servers: Servers,
    kafka_settings: Settings,
    apis: list[asyncio.subprocess.Process],
    tmp_path: Path,
) -> None:
    """Two replicas; the second one's replay is paused, so it falls behind the first. When the
    first crashes, a header read from it may still be in use: the API answers UNAVAILABLE until
    none can be, then serves the second replica with the second replica's (older) position,
    never with the first one's; the second one catches up once replayed."""
    await asyncio.to_thread(upgrade, servers.primary_url)
    first, second = servers.replica_urls
    expected = await project(kafka_settings, servers.primary_url, 200)
    before = await positions_of(servers.primary_url)

    async def caught_up(url: str, positions: dict[tuple[str, int], int]) -> bool:
        return await positions_of(url) == positions

    await eventually(lambda: caught_up(first, before))
    await eventually(lambda: caught_up(second, before))
    await set_replay(second, paused=True)
    try:
        more = await project(kafka_settings, servers.primary_url, 201)
        after = await positions_of(servers.primary_url)
        assert after != before
        await eventually(lambda: caught_up(first, after))
        assert await positions_of(second) == before

        port = free_port()
        log = tmp_path / "api.log"
        apis.append(
            await serve_api(
                servers.primary_url,
                port,
                log,
                kafka_bootstrap_servers=kafka_settings.kafka_bootstrap_servers,
                api_read_database_urls=f"{first},{second}",
                api_health_interval_seconds="0.2",
                api_workers="1",
            )
        )
        some_id = next(cid for cid, state in expected.items() if state.is_open)
        answer, trailing = await get(port, some_id)
        assert parse_positions(trailing[POSITION_HEADER]) == after

        servers.run("replica", "crash", env=servers.replica_envs[0])
        unavailable = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            assert loop.time() < deadline, "never served from the second replica"
            try:
                answer, trailing = await get(port, some_id)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            else:
                code = grpc.StatusCode.OK
            if code != grpc.StatusCode.OK:
                assert code == grpc.StatusCode.UNAVAILABLE
                unavailable += 1
                await asyncio.sleep(0.1)
                continue
            # Whatever is answered comes from the second replica, still at `before`.
            assert parse_positions(trailing[POSITION_HEADER]) == before
            break
        assert unavailable > 0, "the header from the first replica was not in use any more"
        assert "is unavailable" in log.read_text()
        for connection_id, state in expected.items():
            answer, trailing = await get(port, connection_id)
            assert_answers(answer, state)
            assert parse_positions(trailing[POSITION_HEADER]) == before
    finally:
        await set_replay(second, paused=False)

    async def serves_after() -> bool:
        _, trailing = await get(port, some_id)
        return parse_positions(trailing[POSITION_HEADER]) == after

    await eventually(serves_after)
    for connection_id, state in more.items():
        answer, _ = await get(port, connection_id)
        assert_answers(answer, state)

    # The first replica comes back: the health probe sees it, reads go there again.
    servers.run("replica", "up", env=servers.replica_envs[0])
    await eventually(lambda: caught_up(first, after))

    async def first_back() -> bool:
        return "answers again" in log.read_text()

    await eventually(first_back)
    for connection_id, state in more.items():
        answer, trailing = await get(port, connection_id)
        assert_answers(answer, state)
        assert parse_positions(trailing[POSITION_HEADER]) == after
    assert_clean_log(log)


async def test_get_reads_the_replica_with_exact_freshness_and_survives_a_primary_crash(
    servers: Servers,
    kafka_settings: Settings,
    apis: list[asyncio.subprocess.Process],
    tmp_path: Path,
) -> None:
    await asyncio.to_thread(upgrade, servers.primary_url)
    expected = await project(kafka_settings, servers.primary_url, 400)
    primary_positions = await positions_of(servers.primary_url)
    topic = kafka_settings.events_topic
    assert sum(o for (t, _), o in primary_positions.items() if t == topic) == 400
    replica = servers.replica_urls[0]

    async def replicated() -> bool:
        return await positions_of(replica) == primary_positions

    await eventually(replicated)

    settings = {
        "kafka_bootstrap_servers": kafka_settings.kafka_bootstrap_servers,
        "api_read_database_urls": replica,
        "api_workers": "1",
    }
    port = free_port()
    apis.append(await serve_api(servers.primary_url, port, tmp_path / "api1.log", **settings))
    for connection_id, state in expected.items():
        answer, trailing = await get(port, connection_id)
        assert_answers(answer, state)
        # Exact: the API started after the replica had caught up with the primary.
        assert parse_positions(trailing[POSITION_HEADER]) == primary_positions
    assert any(state.is_open for state in expected.values())
    assert any(not state.is_open for state in expected.values())
    # The reads went to the replica, and the API holds no session on the primary.
    assert await api_sessions(replica) > 0
    assert await api_sessions(servers.primary_url) == 0

    servers.run("crash")
    for connection_id, state in expected.items():
        answer, trailing = await get(port, connection_id)
        assert_answers(answer, state)
        assert parse_positions(trailing[POSITION_HEADER]) == primary_positions
    assert await health_status(port) == SERVING

    # An API started while the primary is down needs only the replica.
    second = free_port()
    apis.append(await serve_api(servers.primary_url, second, tmp_path / "api2.log", **settings))
    for connection_id, state in list(expected.items())[:50]:
        answer, trailing = await get(second, connection_id)
        assert_answers(answer, state)
        assert parse_positions(trailing[POSITION_HEADER]) == primary_positions
    assert_clean_log(tmp_path / "api1.log")
    assert_clean_log(tmp_path / "api2.log")
