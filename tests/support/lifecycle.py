"""The lifecycle role around tests: fresh lifecycle and state topics, the role in-process or as
a `conntrack-lifecycle` subprocess (to be SIGKILLed), and reading the lifecycle topic as a
read_committed consumer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from conntrack.core.protogen.conntrack.lifecycle.v1 import lifecycle_pb2 as pb
from conntrack.core.settings import Settings
from conntrack.lifecycle.reading import assign_from_beginning, partitions_of
from conntrack.lifecycle.records import decode_lifecycle
from conntrack.lifecycle.runner import LifecycleRole
from tests.support.kafka import delete_topics, unique

LIFECYCLE = Path(sys.executable).parent / "conntrack-lifecycle"
CLOSED = pb.Closed


@contextlib.asynccontextmanager
async def with_lifecycle_topics(
    settings: Settings, lease_seconds: float = 3.0
) -> AsyncIterator[Settings]:
    """The settings with fresh lifecycle topics (the role creates them), group and
    transactional id, and a short lease."""
    lifecycle, state = unique("lifecycle"), unique("lifecycle-state")
    try:
        yield settings.model_copy(
            update={
                "lifecycle_topic": lifecycle,
                "lifecycle_state_topic": state,
                "lifecycle_group": unique("lifecycle-group"),
                "lifecycle_transactional_id": unique("lifecycle-txn"),
                "node_lease_seconds": lease_seconds,
                "retry_max_backoff_seconds": 1,
            }
        )
    finally:
        await delete_topics(settings.kafka_bootstrap_servers, [lifecycle, state])


@contextlib.asynccontextmanager
async def lifecycle_role(settings: Settings) -> AsyncIterator[LifecycleRole]:
    """The role running in this process until the block ends."""
    role = LifecycleRole(settings)
    task = asyncio.create_task(role.run())
    try:
        yield role
    finally:
        await role.stop()
        await asyncio.wait_for(task, 60)


class LifecycleProcess:
    """One `conntrack-lifecycle` subprocess; its output goes to a file."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")}
        names = (
            "kafka_bootstrap_servers",
            "events_topic",
            "commands_topic",
            "lifecycle_topic",
            "lifecycle_state_topic",
            "lifecycle_group",
            "lifecycle_transactional_id",
            "node_lease_seconds",
            "retry_max_backoff_seconds",
        )
        env.update({f"CONNTRACK_{n.upper()}": str(getattr(settings, n)) for n in names})
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [str(LIFECYCLE)], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def started(self, within: float = 60) -> None:
        """Wait until it has restored its state and reads the log."""
        deadline = asyncio.get_running_loop().time() + within
        while "event=started" not in self.log():
            assert self.process.poll() is None, self.log()
            assert asyncio.get_running_loop().time() < deadline, self.log()
            await asyncio.sleep(0.1)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    async def terminate(self, within: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, within)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self._log.close()


@dataclass(frozen=True)
class ToldRecord:
    event: pb.LifecycleEvent
    headers: dict[str, bytes]
    partition: int
    key: bytes


async def read_lifecycle(
    settings: Settings, *, idle_s: float = 1.5, committed: bool = True
) -> list[ToldRecord]:
    """Everything committed to the lifecycle topic so far, in each partition's order, as a
    read_committed consumer sees it (read until the end offsets, then `idle_s` more); with
    committed=False, also what aborted transactions wrote."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        isolation_level="read_committed" if committed else "read_uncommitted",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        tps = await assign_from_beginning(consumer, settings.lifecycle_topic)
        ends = await consumer.end_offsets(tps)
        out: list[ToldRecord] = []
        loop = asyncio.get_running_loop()
        quiet_until = loop.time() + idle_s
        while True:
            data = await consumer.getmany(timeout_ms=200)
            for tp, records in data.items():
                out += [
                    ToldRecord(decode_lifecycle(r.value), dict(r.headers), tp.partition, r.key)
                    for r in records
                ]
            if data:
                quiet_until = loop.time() + idle_s
            done = all([await consumer.position(tp) >= ends[tp] for tp in tps])
            if done and loop.time() >= quiet_until:
                return out
    finally:
        await consumer.stop()


def by_connection(told: list[ToldRecord]) -> dict[str, list[ToldRecord]]:
    out: dict[str, list[ToldRecord]] = {}
    for t in told:
        out.setdefault(t.event.connection_id, []).append(t)
    return out


def assert_told_once(told: list[ToldRecord]) -> dict[str, list[ToldRecord]]:
    """Each connection: exactly one opened, then exactly one closed at most; returns them."""
    each = by_connection(told)
    wrong = {
        cid: [t.event.WhichOneof("kind") for t in ts]
        for cid, ts in each.items()
        if [t.event.WhichOneof("kind") for t in ts] not in (["opened"], ["opened", "closed"])
    }
    assert not wrong, f"{len(wrong)} connections told wrongly, e.g. {next(iter(wrong.items()))}"
    return each


class LifecycleWatcher:
    """A read_committed consumer of the lifecycle topic running in the background, from the
    beginning: what it has seen so far, by connection, and a wait for a condition on it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.told: dict[str, list[ToldRecord]] = {}
        self.seen = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        s = self._settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            isolation_level="read_committed",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            await assign_from_beginning(consumer, s.lifecycle_topic, within_s=60)
            while True:
                data = await consumer.getmany(timeout_ms=200)
                for tp, records in data.items():
                    for r in records:
                        told = ToldRecord(
                            decode_lifecycle(r.value), dict(r.headers), tp.partition, r.key
                        )
                        self.told.setdefault(told.event.connection_id, []).append(told)
                if data:
                    self.seen.set()
        finally:
            await consumer.stop()

    async def until(
        self, condition: Callable[[dict[str, list[ToldRecord]]], bool], within: float
    ) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while not condition(self.told):
            assert self._task is not None
            if self._task.done():
                self._task.result()  # its error, if it failed
                raise AssertionError("the watcher stopped")
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, "the lifecycle stream did not get there in time"
            self.seen.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.seen.wait(), min(remaining, 0.5))

    async def __aenter__(self) -> LifecycleWatcher:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def kill_in_a_transaction(
    settings: Settings, process: LifecycleProcess, within: float = 30
) -> None:
    """SIGKILL the role while a transaction of its is open on the lifecycle topic: when the
    topic's high watermark (what read_uncommitted sees) is past its last stable offset (what
    read_committed sees) on some partition. Fails if none is seen within `within` seconds."""
    clients = [
        AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            isolation_level=level,
            enable_auto_commit=False,
        )
        for level in ("read_committed", "read_uncommitted")
    ]
    for client in clients:
        await client.start()
    try:
        committed, uncommitted = clients
        deadline = asyncio.get_running_loop().time() + within
        tps = await partitions_of(committed, settings.lifecycle_topic, within)
        while True:
            stable = await committed.end_offsets(tps)
            written = await uncommitted.end_offsets(tps)
            if any(written[tp] > stable[tp] for tp in tps):
                process.kill()
                return
            assert asyncio.get_running_loop().time() < deadline, "no open transaction seen"
            await asyncio.sleep(0.005)
    finally:
        for client in clients:
            await client.stop()
