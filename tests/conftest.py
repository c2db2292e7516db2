"""Shared fixtures. Integration tests run against the real broker and PostgreSQL server that
`make test` starts (infra/kafka.sh, infra/postgres.sh); nothing is mocked.

Each test gets fresh resources: its own topics, consumer group and database, so tests never see
each other's events or rows.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.read.database import create_read_engine
from conntrack.core.database import create_engine
from conntrack.core.settings import Settings
from conntrack.migrations.cli import upgrade
from tests.support.cluster import Cluster
from tests.support.kafka import create_topic, delete_topics, unique
from tests.support.ports import free_port
from tests.support.projector import ProjectorProcess

KAFKA = os.environ.get("CONNTRACK_TEST_KAFKA", "127.0.0.1:19092")
POSTGRES_URL = os.environ.get(
    "CONNTRACK_TEST_POSTGRES_URL", "postgresql+asyncpg://conntrack@127.0.0.1:55432/conntrack"
)
BACKENDS = ("sqlite", "postgres")


def _reachable(hostport: str) -> bool:
    host, _, port = hostport.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    if not _reachable(KAFKA):
        pytest.fail(f"no Kafka broker at {KAFKA}: run infra/kafka.sh up (make test does)")
    return KAFKA


@pytest.fixture
async def kafka_settings(kafka_bootstrap: str) -> AsyncIterator[Settings]:
    """Settings naming a fresh events topic (3 partitions), dead-letter topic and group."""
    events, dlq = unique("events"), unique("dlq")
    await create_topic(kafka_bootstrap, events, 3)
    await create_topic(kafka_bootstrap, dlq, 1)
    yield Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        events_topic=events,
        dead_letter_topic=dlq,
        consumer_group=unique("group"),
        batch_max_wait_ms=50,
    )
    await delete_topics(kafka_bootstrap, [events, dlq])


async def _create_pg_database() -> str:
    if not _reachable(f"{make_url(POSTGRES_URL).host}:{make_url(POSTGRES_URL).port}"):
        pytest.fail(f"no PostgreSQL at {POSTGRES_URL}: run infra/postgres.sh up (make test does)")
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = make_url(POSTGRES_URL)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database
    )
    try:
        # A natural-language collation, as most production servers have (this server's default
        # is C.UTF-8): text the store compares must not depend on it (test_store.py).
        await conn.execute(
            f'CREATE DATABASE "{name}" TEMPLATE template0 '
            "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
    finally:
        await conn.close()
    return url.set(database=name).render_as_string(hide_password=False)


async def _drop_pg_database(db_url: str) -> None:
    url = make_url(POSTGRES_URL)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database
    )
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{make_url(db_url).database}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def empty_database_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database on each backend (tests using it run once per backend)."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'readmodel.db'}"
        return
    url = await _create_pg_database()
    yield url
    await _drop_pg_database(url)


@pytest.fixture
def database_url(empty_database_url: str) -> str:
    """A fresh database migrated to the newest schema."""
    upgrade(empty_database_url)
    return empty_database_url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(database_url)
    yield eng
    await eng.dispose()


@pytest.fixture
async def read_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_read_engine(database_url, timeout_seconds=60)
    yield engine
    await engine.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Runs a test once per read-model backend: the contract every backend must keep."""
    return str(request.param)


# A private broker a test may stop and restart (the shared one must stay up for everyone).
REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "infra" / "kafka.sh"


@dataclass
class PrivateBroker:
    bootstrap: str
    env: dict[str, str]

    def _run(self, command: str) -> None:
        done = subprocess.run(
            [str(KAFKA_SH), command], env=self.env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, f"infra/kafka.sh {command}: {done.stdout}{done.stderr}"

    async def up(self) -> None:
        await asyncio.to_thread(self._run, "up")

    async def down(self) -> None:
        await asyncio.to_thread(self._run, "down")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A three-broker cluster (infra/kafka.sh cluster) for a test module: starting three JVMs
    takes a while. A test that stops a node brings it back up before the next one needs it."""
    cluster = Cluster.create(tmp_path_factory.mktemp("kafka-cluster"), 3)
    cluster.run("up", "3")
    try:
        yield cluster
    finally:
        cluster.run("down")


@pytest.fixture(scope="module")
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    """One broker for this module (starting one takes seconds); each test brings it up."""
    tmp_path = tmp_path_factory.mktemp("kafka")
    distributions = sorted((REPO / ".local").glob("kafka-dist-*"))
    if not distributions:
        pytest.fail("no Kafka distribution under .local: run infra/kafka.sh up once")
    for dist in distributions:
        (tmp_path / dist.name).symlink_to(dist)
    port, controller_port = free_port(), free_port()
    broker = PrivateBroker(
        f"127.0.0.1:{port}",
        {
            **os.environ,
            "CONNTRACK_STATE_DIR": str(tmp_path),
            "CONNTRACK_KAFKA_PORT": str(port),
            "CONNTRACK_KAFKA_CTRL_PORT": str(controller_port),
            "CONNTRACK_KAFKA_HEAP": "256m",
        },
    )
    broker._run("up")
    try:
        yield broker
    finally:
        broker._run("down")


@pytest.fixture
def processes() -> Any:
    started: list[ProjectorProcess] = []
    yield started
    for p in started:
        p.close()
