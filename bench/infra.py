"""Fresh, disposable resources on the real servers: topics and databases per scenario, named
conntrack-bench-* (conntrack_bench_* for databases) so an interrupted run is easy to spot and
clean (BENCHMARKS.md, "Cleaning up")."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy.engine import URL, make_url

from bench.config import BenchConfig
from conntrack.core.settings import Settings
from conntrack.migrations.cli import upgrade
from conntrack.producer.topics import TopicSpec, ensure_topics

log = logging.getLogger(__name__)


PREFIX = "conntrack-bench-"
# What unique() makes, topic or (with _ for -) database: `clean` removes only these.
_LEFTOVER = re.compile(r"^conntrack[-_]bench[-_][a-z0-9_-]*[-_][0-9a-f]{10}$")


def unique(label: str) -> str:
    return f"{PREFIX}{label}-{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def fresh_topics(cfg: BenchConfig, label: str) -> AsyncIterator[tuple[str, str]]:
    """A new events topic (cfg.partitions partitions, history-keeping like production) and its
    dead-letter topic; both deleted on exit."""
    events, dlq = unique(label), unique(label + "-dlq")
    await ensure_topics(
        cfg.kafka,
        [TopicSpec(events, cfg.partitions, 1, 1), TopicSpec(dlq, 1, 1, 1)],
    )
    try:
        yield events, dlq
    finally:
        admin = AIOKafkaAdminClient(bootstrap_servers=cfg.kafka)
        await admin.start()
        try:
            await admin.delete_topics([events, dlq])
        except Exception as exc:  # cleanup must not hide the scenario's own outcome
            log.warning("could not delete topics %s, %s: %r", events, dlq, exc)
        finally:
            await admin.close()


async def _admin_connection(cfg: BenchConfig) -> asyncpg.Connection:
    url = make_url(cfg.postgres_url)
    return await asyncpg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        database=url.database,
    )


@asynccontextmanager
async def fresh_database(cfg: BenchConfig, label: str) -> AsyncIterator[str]:
    """A new PostgreSQL database migrated to the newest schema; dropped on exit. Yields its
    SQLAlchemy URL (with password, for subprocesses)."""
    name = unique(label).replace("-", "_")
    conn = await _admin_connection(cfg)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = make_url(cfg.postgres_url).set(database=name).render_as_string(hide_password=False)
    try:
        # Alembic's env.py runs its own event loop, so it needs a thread of its own.
        await asyncio.to_thread(upgrade, url)
        yield url
    finally:
        conn = await _admin_connection(cfg)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception as exc:
            log.warning("could not drop database %s: %r", name, exc)
        finally:
            await conn.close()


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    """postgresql+asyncpg://... -> postgresql://... for asyncpg.connect()."""
    url: URL = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """Next offset to be written, per partition (what a caught-up consumer's position is)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        offsets = await consumer.end_offsets(tps)
        return {tp.partition: int(o) for tp, o in offsets.items()}
    finally:
        await consumer.stop()


def projector_settings(
    cfg: BenchConfig, events_topic: str, dlq_topic: str, database_url: str
) -> Settings:
    return Settings(
        kafka_bootstrap_servers=cfg.kafka,
        events_topic=events_topic,
        dead_letter_topic=dlq_topic,
        consumer_group=unique("group"),
        database_url=database_url,
        log_level="WARNING",
    )


def settings_environment(settings: Settings) -> dict[str, str]:
    """The CONNTRACK_* variables that make a subprocess build the same Settings."""
    return {
        "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CONNTRACK_EVENTS_TOPIC": settings.events_topic,
        "CONNTRACK_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "CONNTRACK_CONSUMER_GROUP": settings.consumer_group,
        "CONNTRACK_DATABASE_URL": settings.database_url,
        "CONNTRACK_LOG_LEVEL": settings.log_level,
    }


async def leftovers(cfg: BenchConfig, drop: bool) -> tuple[list[str], list[str]]:
    """Topics and databases named like unique() makes them, left by interrupted runs (all of
    them: never run this beside a benchmark in progress). With drop, delete them. Returns
    (topics, databases)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=cfg.kafka)
    await admin.start()
    try:
        topics = sorted(t for t in await admin.list_topics() if _LEFTOVER.match(t))
        if drop and topics:
            await admin.delete_topics(topics)
    finally:
        await admin.close()
    conn = await _admin_connection(cfg)
    try:
        rows = await conn.fetch("SELECT datname FROM pg_database ORDER BY datname")
        databases = [r["datname"] for r in rows if _LEFTOVER.match(r["datname"])]
        if drop:
            for name in databases:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
    return topics, databases
