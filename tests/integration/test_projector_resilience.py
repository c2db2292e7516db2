"""The projector process rides out an unavailable database and resumes by itself, and prunes
old disconnected connections without letting late duplicates bring them back."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.core.database import create_engine
from conntrack.core.events import Activity, Connected, Disconnected, Event
from conntrack.core.fold import fold
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from tests.conftest import POSTGRES_URL
from tests.support.events import as_records, make_events
from tests.support.kafka import publish, publish_stream
from tests.support.ports import free_port
from tests.support.projector import (
    ProjectorProcess,
    assert_matches_fold,
    scrape,
    stored,
    wait_caught_up,
    wait_for_log,
    wait_until,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def _admin() -> asyncpg.Connection:
    url = make_url(POSTGRES_URL)
    return await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database
    )


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_connections_terminated_and_refused_mid_run(
    kafka_settings: Settings,
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    processes: list[ProjectorProcess],
) -> None:
    s = kafka_settings
    store = ProjectionStore(engine)
    topic = s.events_topic
    dbname = make_url(database_url).database
    events = make_events(random.Random(7), "r", 5000, 600)
    processes.append(
        p := ProjectorProcess(s, database_url, tmp_path / "p.log", batch_max_events=100)
    )
    await wait_for_log(p, "event=assigned")
    admin = await _admin()
    try:
        publishing = asyncio.create_task(
            publish_stream(s.kafka_bootstrap_servers, topic, as_records(events[:2500]))
        )
        # Connections killed under the projector's feet, again and again, while it applies.
        await wait_until(store, topic, lambda pos: sum(pos.values()) > 0, 60, "progress")
        terminated = 0
        while not publishing.done():
            terminated += await admin.fetchval(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid() "
                "AND application_name NOT LIKE 'pytest%') t",
                dbname,
            )
            await asyncio.sleep(0.1)
        await publishing
        assert terminated > 0
        # Then the database refuses connections altogether for a while.
        await engine.dispose()
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            dbname,
        )
        retries_before = p.log().count("event=retry cause=database")
        await publish(s.kafka_bootstrap_servers, topic, as_records(events[2500:]))
        await wait_for_log(p, "event=retry cause=database", more_than=retries_before + 2)
        assert p.process.poll() is None, p.log()
        assert "is not currently accepting connections" in p.log()
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    finally:
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        await admin.close()
    await wait_caught_up(store, s, within=90)
    await assert_matches_fold(store, events)
    assert await p.terminate() == 0
    assert p.records_committed() == len(events)


def _set_immutable(paths: list[Path], on: bool) -> None:
    for path in paths:
        if path.exists():
            subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_file_unwritable_mid_run(
    kafka_settings: Settings,
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    processes: list[ProjectorProcess],
) -> None:
    s = kafka_settings
    store = ProjectionStore(engine)
    topic = s.events_topic
    db = Path(make_url(database_url).database or "")
    events = make_events(random.Random(8), "w", 3000, 400)
    processes.append(p := ProjectorProcess(s, database_url, tmp_path / "p.log"))
    await publish(s.kafka_bootstrap_servers, topic, as_records(events[:1000]))
    await wait_caught_up(store, s)
    # chattr +i: even root cannot write, through open descriptors too (the tests run as root,
    # where chmod would change nothing). The shared-memory index stays writable.
    files = [db, db.with_name(db.name + "-wal")]
    _set_immutable(files, True)
    try:
        await publish(s.kafka_bootstrap_servers, topic, as_records(events[1000:2000]))
        await wait_for_log(p, "event=retry cause=database")
        assert p.process.poll() is None, p.log()
    finally:
        _set_immutable(files, False)
    await publish(s.kafka_bootstrap_servers, topic, as_records(events[2000:]))
    await wait_caught_up(store, s, within=90)
    await assert_matches_fold(store, events)
    assert await p.terminate() == 0
    assert p.records_committed() == len(events)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_connection_opened_while_the_sqlite_file_was_unwritable_is_replaced(
    database_url: str,
) -> None:
    """SQLite opens a file it may not write read-only, without a word, and such a connection
    stays read-only for good: the engine must discard it, not hand it out again."""
    db = Path(make_url(database_url).database or "")
    files = [db, db.with_name(db.name + "-wal")]
    engine = create_engine(database_url)
    store = ProjectionStore(engine)
    try:
        _set_immutable(files, True)
        try:
            with pytest.raises(OperationalError, match="readonly database"):
                await store.positions("t", [0])
        finally:
            _set_immutable(files, False)
        assert await store.positions("t", [0]) == {0: 0}
        await store.apply_batch("t", {0: (0, 5)}, {})
        assert await store.positions("t", [0]) == {0: 5}
    finally:
        _set_immutable(files, False)
        await engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_projector_started_while_the_sqlite_file_is_unwritable_recovers_by_itself(
    kafka_settings: Settings,
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    processes: list[ProjectorProcess],
) -> None:
    s = kafka_settings
    store = ProjectionStore(engine)
    db = Path(make_url(database_url).database or "")
    files = [db, db.with_name(db.name + "-wal")]
    events = make_events(random.Random(9), "ro", 2000, 300)
    await publish(s.kafka_bootstrap_servers, s.events_topic, as_records(events[:800]))
    _set_immutable(files, True)
    try:
        processes.append(p := ProjectorProcess(s, database_url, tmp_path / "p.log"))
        await wait_for_log(p, "readonly database", more_than=2)
        assert p.process.poll() is None, p.log()
    finally:
        _set_immutable(files, False)
    await publish(s.kafka_bootstrap_servers, s.events_topic, as_records(events[800:]))
    await wait_caught_up(store, s, within=90)
    await assert_matches_fold(store, events)
    assert await p.terminate() == 0
    assert p.records_committed() == len(events)


async def test_retention_prunes_old_disconnected_connections_for_good(
    kafka_settings: Settings,
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    processes: list[ProjectorProcess],
) -> None:
    s = kafka_settings
    store = ProjectionStore(engine)
    now = time.time_ns()
    hour = 3600 * 1_000_000_000
    old = [
        e
        for i in range(40)
        for e in (
            Event(f"oc{i}", f"old-{i}", "gw", now - 3 * hour, Connected("10.0.0.1", "ua")),
            Event(f"od{i}", f"old-{i}", "gw", now - 2 * hour, Disconnected(1000, "")),
        )
    ]
    recent = [
        e
        for i in range(20)
        for e in (
            Event(f"rc{i}", f"recent-{i}", "gw", now - 3 * hour, Connected("10.0.0.2", "ua")),
            Event(f"rd{i}", f"recent-{i}", "gw", now - hour // 60, Disconnected(1001, "")),
        )
    ]
    still_open = [
        Event(f"sc{i}", f"open-{i}", "gw", now - 5 * hour, Connected("10.0.0.3", "ua"))
        for i in range(20)
    ]
    port = free_port()
    processes.append(
        p := ProjectorProcess(
            s,
            database_url,
            tmp_path / "p.log",
            retention_disconnected_seconds=3600,
            retention_interval_seconds=0.2,
            metrics_port=port,
        )
    )
    await publish(s.kafka_bootstrap_servers, s.events_topic, as_records(old + recent + still_open))
    await wait_caught_up(store, s)

    async def pruned() -> bool:
        return len(await store.tombstones()) == 40

    deadline = asyncio.get_running_loop().time() + 30
    while not await pruned():
        assert asyncio.get_running_loop().time() < deadline, p.log()
        await asyncio.sleep(0.1)
    survivors = {cid: st for cid, st in fold(old + recent + still_open).items() if "old" not in cid}
    assert await store.all_states() == survivors

    # Late duplicates of pruned connections (a Connected re-sent, an activity straggler)
    # change nothing; the read model stays the pruned fold.
    resent = [e for e in old if e.event_id.startswith("oc")][:10]
    late = [*resent, Event("late-a", "old-3", "gw", now - 2 * hour + 5, Activity(1))]
    await publish(s.kafka_bootstrap_servers, s.events_topic, as_records(late))
    await wait_caught_up(store, s)
    assert await store.all_states() == survivors
    metrics = await scrape(port)
    assert metrics[("conntrack_projector_pruned_connections_total", ())] == 40
    assert metrics[("conntrack_projector_events_of_pruned_connections_total", ())] == 10
    assert await p.terminate() == 0
    assert "event=pruned rows=40" in p.log()
    published = len(old) + len(recent) + len(still_open) + len(late)
    assert sum((await stored(store, s.events_topic)).values()) == published


class BrokerGate:
    """A TCP forwarder to the broker, for bootstrapping only (the broker's metadata names its
    own address for everything after that): closed, the broker looks unreachable."""

    def __init__(self, broker: str) -> None:
        host, _, port = broker.rpartition(":")
        self._target = (host, int(port))
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in self._pipes:
            task.cancel()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_broker_unreachable_at_start_then_resumes_by_itself(
    kafka_settings: Settings,
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    processes: list[ProjectorProcess],
) -> None:
    s = kafka_settings
    store = ProjectionStore(engine)
    gate = BrokerGate(s.kafka_bootstrap_servers)
    events = make_events(random.Random(9), "b", 500, 50)
    await publish(s.kafka_bootstrap_servers, s.events_topic, as_records(events))
    processes.append(
        p := ProjectorProcess(
            s, database_url, tmp_path / "p.log", kafka_bootstrap_servers=f"127.0.0.1:{gate.port}"
        )
    )
    try:
        await wait_for_log(p, "event=retry cause=broker", more_than=1)
        assert p.process.poll() is None, p.log()
        assert await stored(store, s.events_topic) == {}
        await gate.open()
        await wait_caught_up(store, s)
        await assert_matches_fold(store, events)
        assert await p.terminate() == 0
    finally:
        await gate.close()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sigterm_while_the_broker_is_unreachable_exits_zero(
    kafka_settings: Settings,
    database_url: str,
    tmp_path: Path,
    processes: list[ProjectorProcess],
) -> None:
    processes.append(
        p := ProjectorProcess(
            kafka_settings,
            database_url,
            tmp_path / "p.log",
            kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
        )
    )
    await wait_for_log(p, "event=retry cause=broker")
    assert await p.terminate(within=30) == 0
    assert "stopped cleanly" in p.log()


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_sigterm_while_the_database_is_down_abandons_the_batch_and_exits_zero(
    kafka_settings: Settings,
    database_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    processes: list[ProjectorProcess],
) -> None:
    s = kafka_settings
    store = ProjectionStore(engine)
    dbname = make_url(database_url).database
    events = make_events(random.Random(10), "a", 2000, 300)
    processes.append(p := ProjectorProcess(s, database_url, tmp_path / "p.log"))
    await publish(s.kafka_bootstrap_servers, s.events_topic, as_records(events[:1000]))
    await wait_caught_up(store, s)
    await engine.dispose()
    admin = await _admin()
    try:
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            dbname,
        )
        await publish(s.kafka_bootstrap_servers, s.events_topic, as_records(events[1000:]))
        await wait_for_log(p, "event=retry cause=database")
        assert await p.terminate(within=30) == 0
    finally:
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        await admin.close()
    assert "event=abandoned stage=writing cause=database" in p.log()
    assert "stopped cleanly" in p.log()
    # Nothing of the abandoned batch was committed; the next process applies it.
    assert sum((await stored(store, s.events_topic)).values()) == p.records_committed() == 1000
    processes.append(again := ProjectorProcess(s, database_url, tmp_path / "again.log"))
    await wait_caught_up(store, s)
    await assert_matches_fold(store, events)
    assert await again.terminate() == 0
    assert again.records_committed() == 1000
