"""Figure 11: the lifecycle role (conntrack-lifecycle).

11a. Throughput: the role, in this process, from its first read to every event of a pre-loaded
churn-heavy topic told and committed, beside the projector (durable PostgreSQL) folding the same
topic into the read model in the same run.

11b. Fencing: a reference gateway node (`conntrack-gateway`) holding 10,000 real WebSocket
clients is SIGKILLed; measured is the time from the kill to the moment a read_committed consumer
of the lifecycle topic has seen the last of the 10,000 closed(node_lost), with the default lease
(30 s) and heartbeat (5 s). Target: <= lease + 5 s."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from bench.config import BenchConfig
from bench.consumption import projector_catch_up
from bench.infra import fresh_database, fresh_topics, projector_settings, unique
from bench.results import Figure, ScenarioResult, at_most
from bench.scenarios.projector import load_mix
from bench.scenarios.send import _clients, _gateway, _wait_log
from bench.services import running
from bench.workloads import churn_heavy
from conntrack.core.settings import Settings, default
from conntrack.lifecycle.reading import assign_from_beginning
from conntrack.lifecycle.records import decode_lifecycle
from conntrack.lifecycle.runner import LifecycleRole
from conntrack.producer.topics import TopicSpec, ensure_topics

NODE_CONNECTIONS = 10_000
FENCE_MARGIN_S = 5.0


def _lifecycle_settings(cfg: BenchConfig, events: str, commands: str) -> Settings:
    return Settings(
        kafka_bootstrap_servers=cfg.kafka,
        events_topic=events,
        commands_topic=commands,
        lifecycle_topic=unique("lifecycle"),
        lifecycle_state_topic=unique("lifecycle-state"),
        lifecycle_group=unique("lifecycle-group"),
        lifecycle_transactional_id=unique("lifecycle-txn"),
        log_level="WARNING",
    )


@contextlib.asynccontextmanager
async def _role(settings: Settings) -> AsyncIterator[LifecycleRole]:
    role = LifecycleRole(settings)
    task = asyncio.create_task(role.run())
    try:
        yield role
    finally:
        await role.stop()
        await asyncio.wait_for(task, 60)
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
        await admin.start()
        try:
            await admin.delete_topics([settings.lifecycle_topic, settings.lifecycle_state_topic])
        finally:
            await admin.close()


async def _commands_topic(cfg: BenchConfig) -> str:
    commands = unique("commands")
    await ensure_topics(
        cfg.kafka, [TopicSpec(commands, cfg.partitions, 1, 1, retention_ms=3_600_000)]
    )
    return commands


async def run(cfg: BenchConfig, result: ScenarioResult) -> None:
    await _throughput(cfg, result)
    await _fencing(cfg, result)


async def _throughput(cfg: BenchConfig, result: ScenarioResult) -> None:
    commands = await _commands_topic(cfg)
    async with fresh_topics(cfg, "lifecycle") as (topic, dlq):
        end = await load_mix(cfg, churn_heavy(cfg.throughput_events), topic, result)
        total = sum(end.values())
        async with fresh_database(cfg, "lifecycle") as url:
            projector = await projector_catch_up(
                projector_settings(cfg, topic, dlq, url), cfg.partitions, end, max(60, total / 1000)
            )
        settings = _lifecycle_settings(cfg, topic, commands)
        async with _role(settings) as role:
            await asyncio.wait_for(role.reading.wait(), 120)
            began = time.perf_counter()
            while role.positions != end:
                if time.perf_counter() - began > max(120, total / 1000):
                    raise TimeoutError(f"the lifecycle role is at {role.positions}, end {end}")
                await asyncio.sleep(0.005)
            seconds = time.perf_counter() - began
            told = role.metrics.registry.get_sample_value("conntrack_lifecycle_transactions_total")
    rate = total / seconds
    result.params.update(lifecycle_seconds=round(seconds, 2), lifecycle_transactions=told)
    result.add(
        Figure(
            "lifecycle_events_per_s",
            "lifecycle role: churn-heavy events read, told and committed per second",
            rate,
            "events/s",
            ceiling=projector.events / projector.applying_seconds,
            ceiling_label="the projector folding the same topic (durable PostgreSQL)",
        )
    )


async def _fencing(cfg: BenchConfig, result: ScenarioResult) -> None:
    n = min(NODE_CONNECTIONS, max(100, int(NODE_CONNECTIONS * cfg.scale)))
    lease = float(default("node_lease_seconds"))
    log_dir = cfg.work_dir / "logs"
    ctx = multiprocessing.get_context("spawn")
    commands = await _commands_topic(cfg)
    outcomes = unique("outcomes")
    await ensure_topics(cfg.kafka, [TopicSpec(outcomes, 1, 1, 1, retention_ms=3_600_000)])
    async with fresh_topics(cfg, "fencing") as (topic, _dlq):
        settings = _lifecycle_settings(cfg, topic, commands)
        gateway = _gateway(cfg, topic, commands, outcomes, log_dir)
        async with running(gateway), _role(settings) as role:
            url = (await _wait_log(gateway, "listening on ws://")).split()[2]
            stop, ids, out = ctx.Event(), ctx.Queue(), ctx.Queue()
            holder = ctx.Process(target=_clients, args=(url, n, ids, stop, out))
            holder.start()
            try:
                await asyncio.to_thread(ids.get, True, 300)
                deadline = time.monotonic() + 300
                while role.teller.open_count < n:  # told opened, all of them
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{role.teller.open_count} of {n} told opened")
                    await asyncio.sleep(0.1)
                killed_at = time.monotonic()
                os.kill(gateway.pid, signal.SIGKILL)
                last = await _last_closed(settings, n, within_s=lease + 120)
            finally:
                stop.set()
                holder.join(timeout=30)
                if holder.is_alive():
                    holder.kill()
    took = last - killed_at
    result.params.update(
        node_connections=n, lease_s=lease, heartbeat_s=default("gateway_heartbeat_seconds")
    )
    result.add(
        Figure(
            "fence_last_closed_s",
            f"a node holding {n:,} sockets SIGKILLed: to the last closed(node_lost) seen",
            took,
            "s",
            ceiling=lease,
            ceiling_label="the lease",
        )
    )
    check = at_most(
        took,
        lease + FENCE_MARGIN_S,
        f"last closed(node_lost) <= lease + {FENCE_MARGIN_S:g} s",
        " s",
    )
    if n < NODE_CONNECTIONS:
        check.met = None
    result.targets.append(check)


async def _last_closed(settings: Settings, n: int, within_s: float) -> float:
    """When a read_committed consumer of the lifecycle topic has seen n closed events (monotonic
    time)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        isolation_level="read_committed",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        await assign_from_beginning(consumer, settings.lifecycle_topic, within_s)
        closed = 0
        deadline = time.monotonic() + within_s
        while closed < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{closed} of {n} closed after {within_s:.0f} s")
            for records in (await consumer.getmany(timeout_ms=100)).values():
                closed += sum(decode_lifecycle(r.value).HasField("closed") for r in records)
        return time.monotonic()
    finally:
        await consumer.stop()
