"""Rebuild without downtime, on the real broker and both read-model backends: the shadow
generation, the atomic switch, resuming an interrupted rebuild, and the live projector carrying
on across the switch."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import grpc
import pytest
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.api.read.repository import ConnectionRepository, create_read_engine
from conntrack.api.transport.server import ApiServer
from conntrack.audit.generations import RETIRED, SHADOW, RebuildError, abandon, shadow_exists
from conntrack.audit.log import LogReader
from conntrack.audit.rebuild import Progress, Rebuild
from conntrack.audit.replay import verify
from conntrack.core.database import is_sqlite
from conntrack.core.events import Event
from conntrack.core.fold import ConnectionState, fold
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from conntrack.core.schema import LIVE
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.core.timeutil import to_ns
from conntrack.producer.publisher import Publisher
from conntrack.producer.simulator import Workload, generate
from conntrack.projector.runner import Projector
from tests.support.projector import running
from tests.support.readmodel import reltuples

pytestmark = [pytest.mark.kafka]


async def publish(settings: Settings, events: list[Event]) -> None:
    async with Publisher(settings.kafka_bootstrap_servers, settings.events_topic, "rb") as pub:
        for event in events:
            await pub.publish(event)
        await pub.flush()


def reader_for(settings: Settings) -> LogReader:
    return LogReader(settings.kafka_bootstrap_servers, settings.events_topic)


async def caught_up(store: ProjectionStore, settings: Settings, patience: float = 60.0) -> None:
    """Wait until the store's positions reach the log end."""
    async with reader_for(settings) as reader:
        parts = await reader.partitions()
        end = await reader.end(parts)
    deadline = asyncio.get_running_loop().time() + patience
    while True:
        stored = await store.positions(settings.events_topic, parts)
        if all(stored[p] >= end[p] for p in parts):
            return
        assert asyncio.get_running_loop().time() < deadline, (stored, end)
        await asyncio.sleep(0.05)


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def index_names(engine: AsyncEngine, table: str) -> set[str]:
    async with engine.connect() as conn:
        got = await conn.run_sync(lambda c: inspect(c).get_indexes(table))
    return {str(ix["name"]) for ix in got}


async def assert_equals_fresh_fold(
    engine: AsyncEngine, settings: Settings, expected: dict[str, ConnectionState]
) -> None:
    assert await ProjectionStore(engine).all_states() == expected
    async with reader_for(settings) as reader:
        result = await verify(engine, reader)
    assert result.ok, result.differences[:3]
    assert result.compared == len(expected)


class Interrupt(Exception):
    """Stands for a crash of the rebuild between two of its commits."""


def test_progress_reports_rate_and_eta() -> None:
    p = Progress(done=0, total=1000, started=100.0)
    assert p.eta_seconds(now=100.0) is None
    assert "ETA ?" in p.line(now=100.0)
    p.done = 250
    assert p.rate(now=110.0) == pytest.approx(25.0)
    assert p.eta_seconds(now=110.0) == pytest.approx(30.0)
    assert p.line(now=110.0) == "rebuild: 250/1,000 events (25.0%), 25 events/s, ETA 0:00:30"


async def test_interrupted_rebuild_resumes_from_its_shadow_and_switches(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    events = list(generate(Workload(connections=300, seed=11)))
    await publish(kafka_settings, events)
    store = ProjectionStore(engine)
    async with running(Projector(kafka_settings, store)):
        await caught_up(store, kafka_settings)
    live_before = await store.all_states()
    assert live_before == fold(events)

    batches = 0

    def crash_after_three(_: Progress) -> None:
        nonlocal batches
        batches += 1
        if batches == 3:
            raise Interrupt

    async with reader_for(kafka_settings) as reader:
        with pytest.raises(Interrupt):
            await Rebuild(engine, reader, batch_events=100, on_batch=crash_after_three).run()
    # Three batches committed into the shadow; nothing live changed.
    assert await shadow_exists(engine)
    shadow = ProjectionStore(engine, SHADOW)
    assert sum((await shadow.all_positions()).values()) == 300
    assert await store.all_states() == live_before
    assert not await table_names(engine) & {t.name for t in RETIRED.all}

    async with reader_for(kafka_settings) as reader:
        rebuild = Rebuild(engine, reader, batch_events=100)
        result = await rebuild.run()
    assert result.resumed
    assert rebuild.progress.resumed_from == 300
    assert rebuild.progress.done == len(events) - 300  # nothing was folded twice
    assert sum(result.positions.values()) == len(events)
    names = await table_names(engine)
    assert not names & {t.name for t in SHADOW.all}
    assert {t.name for t in RETIRED.all} <= names
    await assert_equals_fresh_fold(engine, kafka_settings, fold(events))
    # The new live tables carry the live index names (the next rebuild can reuse its own).
    assert "ix_connections_disconnected_at_ns" in await index_names(engine, "connections")
    if not is_sqlite(engine):  # and went live analyzed (core/statistics.py)
        assert await reltuples(engine, "connections") == len(fold(events))


async def test_projector_holding_old_positions_is_fenced_after_the_switch_and_loses_nothing(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    first = list(generate(Workload(connections=100, seed=21)))
    second = list(generate(Workload(connections=100, seed=22)))
    third = list(generate(Workload(connections=100, seed=23)))
    await publish(kafka_settings, first)
    store = ProjectionStore(engine)
    async with running(Projector(kafka_settings, store)):
        await caught_up(store, kafka_settings)

    # A projector that has taken its partitions and read their positions, but not yet applied
    # what came after: the switch moves the stored positions past what it expects.
    projector = Projector(kafka_settings, store)
    async with projector:
        for _ in range(300):
            if len(projector.owned_positions) == 3:
                break
            await asyncio.sleep(0.1)
        assert sum(projector.owned_positions.values()) == len(first)
        await publish(kafka_settings, second)
        async with reader_for(kafka_settings) as reader:
            await Rebuild(engine, reader).run()
        assert sum((await store.all_positions()).values()) == len(first) + len(second)

        task = asyncio.create_task(projector.run())
        try:
            await publish(kafka_settings, third)
            await caught_up(store, kafka_settings)
            for _ in range(100):
                if sum(projector.owned_positions.values()) == len(first + second + third):
                    break
                await asyncio.sleep(0.05)
        finally:
            await projector.stop()
            await asyncio.wait_for(task, 30)
    fenced = projector.metrics.registry.get_sample_value("conntrack_projector_fenced_batches_total")
    assert fenced is not None
    assert fenced >= 1
    await assert_equals_fresh_fold(engine, kafka_settings, fold(first + second + third))

    # A second rebuild reuses the shadow names and replaces the retired generation.
    async with reader_for(kafka_settings) as reader:
        again = await Rebuild(engine, reader).run()
    assert not again.resumed
    await assert_equals_fresh_fold(engine, kafka_settings, fold(first + second + third))


async def test_abandon_drops_an_unfinished_shadow_and_a_new_rebuild_starts_over(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    events = list(generate(Workload(connections=50, seed=31)))
    await publish(kafka_settings, events)
    async with reader_for(kafka_settings) as reader:
        caught = await Rebuild(engine, reader, switch=False).run()
    assert sum(caught.positions.values()) == len(events)
    assert await shadow_exists(engine)
    assert await ProjectionStore(engine).count() == 0  # --no-switch leaves live alone
    assert await abandon(engine)
    assert not await shadow_exists(engine)
    assert not await abandon(engine)
    async with reader_for(kafka_settings) as reader:
        result = await Rebuild(engine, reader).run()
    assert not result.resumed
    await assert_equals_fresh_fold(engine, kafka_settings, fold(events))


async def test_a_shadow_left_by_an_older_schema_is_refused(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    async with reader_for(kafka_settings) as reader:
        await Rebuild(engine, reader, switch=False).run()
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE connections_rebuild ADD COLUMN stray INTEGER"))
    async with reader_for(kafka_settings) as reader:
        with pytest.raises(RebuildError, match="--abandon"):
            await Rebuild(engine, reader).run()
    assert {t.name for t in LIVE.all} <= await table_names(engine)


def expected_answer(state: ConnectionState) -> tuple[object, ...]:
    assert state.connected_at_ns is not None
    return (
        state.connection_id,
        state.gateway_id or "",
        state.source_ip or "",
        state.user_agent or "",
        state.connected_at_ns,
        state.last_active_at_ns or state.connected_at_ns,
    )


async def test_rebuild_under_live_traffic_keeps_get_correct_and_ends_as_a_fresh_fold(
    kafka_settings: Settings, engine: AsyncEngine, database_url: str
) -> None:
    history = list(generate(Workload(connections=1500, seed=41)))
    await publish(kafka_settings, history)
    folded = fold(history)
    # Known answers: open connections must come back exactly, disconnected ones NOT_FOUND. The
    # last published ones reach the shadow last: a half-built generation would lack them.
    order = list(dict.fromkeys(e.connection_id for e in history))
    watched = order[:10] + order[-60:]
    open_ids = [c for c in watched if folded[c].disconnected_at_ns is None]
    closed_ids = [c for c in watched if folded[c].disconnected_at_ns is not None]
    assert open_ids
    assert closed_ids

    store = ProjectionStore(engine)
    traffic: list[Event] = []
    stop_traffic = asyncio.Event()
    phase = "before"
    calls: dict[str, int] = {"before": 0, "during": 0, "after": 0}
    wrong: list[str] = []

    async def publish_traffic() -> None:
        async with Publisher(
            kafka_settings.kafka_bootstrap_servers, kafka_settings.events_topic, "live"
        ) as pub:
            seed = 1000
            while not stop_traffic.is_set():
                seed += 1
                for event in generate(Workload(connections=10, seed=seed)):
                    await pub.publish(event)
                    traffic.append(event)
                await pub.flush()
                await asyncio.sleep(0.02)

    async def keep_getting(stub: svc_grpc.ConnectionServiceStub, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for cid in open_ids:
                try:
                    got = await stub.Get(svc.GetConnectionRequest(connection_id=cid), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    wrong.append(f"{phase} {cid}: {exc.code().name} {exc.details()}")
                    continue
                answer = (
                    got.id,
                    got.gateway_id,
                    got.identity.source_ip,
                    got.identity.user_agent,
                    to_ns(got.connected_at),
                    to_ns(got.last_active_at),
                )
                if answer != expected_answer(folded[cid]):
                    wrong.append(f"{phase} {cid}: {answer}")
                calls[phase] += 1
            for cid in closed_ids:
                try:
                    await stub.Get(svc.GetConnectionRequest(connection_id=cid), timeout=5)
                    wrong.append(f"{phase} {cid}: found, but it disconnected")
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        wrong.append(f"{phase} {cid}: {exc.code().name} {exc.details()}")
                calls[phase] += 1

    read_engine = create_read_engine(database_url)
    lines: list[str] = []
    try:
        async with (
            running(Projector(kafka_settings, store)),
            ApiServer(ConnectionRepository(read_engine), "127.0.0.1:0") as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            await caught_up(store, kafka_settings)
            stub = svc_grpc.ConnectionServiceStub(channel)
            stop_getting = asyncio.Event()
            publisher = asyncio.create_task(publish_traffic())
            getter = asyncio.create_task(keep_getting(stub, stop_getting))
            try:
                await asyncio.sleep(0.5)
                phase = "during"
                async with reader_for(kafka_settings) as reader:
                    # Throttled so that Get runs against a half-built shadow for seconds.
                    result = await Rebuild(
                        engine,
                        reader,
                        batch_events=500,
                        max_events_per_second=4000,
                        on_batch=lambda p: lines.append(p.line()),
                    ).run()
                phase = "after"
                await asyncio.sleep(1.5)
            finally:
                stop_traffic.set()
                await asyncio.wait_for(publisher, 30)
                stop_getting.set()
                await asyncio.wait_for(getter, 30)
            await caught_up(store, kafka_settings)
    finally:
        await read_engine.dispose()

    assert wrong == []
    assert calls["during"] > 0
    assert calls["after"] > 0
    assert sum(result.positions.values()) >= len(history)
    assert len(lines) >= len(history) // 500
    assert "events/s" in lines[-1]
    assert traffic  # the log kept growing during the rebuild
    await assert_equals_fresh_fold(engine, kafka_settings, fold(history + traffic))


async def test_switch_folds_what_the_live_projection_applied_beyond_the_shadow(
    kafka_settings: Settings, engine: AsyncEngine
) -> None:
    first = list(generate(Workload(connections=80, seed=51)))
    second = list(generate(Workload(connections=80, seed=52)))
    await publish(kafka_settings, first)
    store = ProjectionStore(engine)
    async with reader_for(kafka_settings) as reader:
        rebuild = Rebuild(engine, reader)
        await rebuild.start()
        await rebuild.catch_up()
        await publish(kafka_settings, second)
        async with running(Projector(kafka_settings, store)):
            await caught_up(store, kafka_settings)
            # Too far ahead for a switch that allows only 10 records: refused, nothing changed.
            cautious = Rebuild(engine, reader, max_switch_gap=10)
            await cautious.start()
            assert await cautious.try_switch() is None
            assert await shadow_exists(engine)
            assert await store.all_states() == fold(first + second)

            assert await rebuild.try_switch() is not None
            assert rebuild.folded_in_switch == len(second)
    assert not await shadow_exists(engine)
    await assert_equals_fresh_fold(engine, kafka_settings, fold(first + second))


def rebuild_command(settings: Settings, database_url: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "conntrack.audit",
        "--bootstrap-servers",
        settings.kafka_bootstrap_servers,
        "--topic",
        settings.events_topic,
        "--database-url",
        database_url,
        "rebuild",
        *args,
    ]


async def test_killed_rebuild_process_resumes_where_it_was_and_switches(
    kafka_settings: Settings, engine: AsyncEngine, database_url: str
) -> None:
    events = list(generate(Workload(connections=1000, seed=61)))
    await publish(kafka_settings, events)
    shadow = ProjectionStore(engine, SHADOW)
    proc = await asyncio.create_subprocess_exec(
        *rebuild_command(
            kafka_settings,
            database_url,
            "--batch-events",
            "100",
            "--max-events-per-second",
            "1000",
            "--progress-interval",
            "0",
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        done = 0
        for _ in range(600):
            if await shadow_exists(engine):
                with contextlib.suppress(Exception):  # created but not yet filled
                    done = sum((await shadow.all_positions()).values())
            if done >= 1000:
                break
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        await proc.wait()
        assert proc.stderr is not None
        killed_progress = (await proc.stderr.read()).decode()
    assert 1000 <= done < len(events), "the rebuild was not killed midway"
    assert "events/s" in killed_progress
    assert await ProjectionStore(engine).count() == 0  # live untouched by the killed run

    resumed = await asyncio.create_subprocess_exec(
        *rebuild_command(kafka_settings, database_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(resumed.communicate(), 120)
    assert resumed.returncode == 0, err.decode()
    assert "resuming" in err.decode()
    assert "switched" in out.decode()
    assert "resumed" in out.decode()
    await assert_equals_fresh_fold(engine, kafka_settings, fold(events))


async def test_switch_retries_while_a_long_reader_holds_the_live_tables(
    kafka_settings: Settings, engine: AsyncEngine, backend: str
) -> None:
    events = list(generate(Workload(connections=50, seed=71)))
    await publish(kafka_settings, events)
    async with engine.connect() as reader_conn:
        # What `conntrack-audit verify` does: one long snapshot transaction over the live rows.
        await reader_conn.execute(text("SELECT count(*) FROM connections"))
        async with reader_for(kafka_settings) as reader:
            task = asyncio.create_task(Rebuild(engine, reader, lock_timeout_seconds=0.2).run())
            await asyncio.sleep(1.5)
            await reader_conn.rollback()
            result = await asyncio.wait_for(task, 60)
    if backend == "postgres":
        # The renames need the reader gone: attempts timed out on the lock and were retried.
        assert result.switch_attempts >= 2
    else:
        assert result.switch_attempts == 1  # SQLite WAL readers never block the writer
    await assert_equals_fresh_fold(engine, kafka_settings, fold(events))
