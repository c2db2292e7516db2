"""Every connection's end told exactly once through the whole system, on both read-model
backends: 2,000 real WebSocket clients on three reference gateway nodes; one node SIGKILLed, one
SIGSTOPped past the lease and then SIGCONTed, one stopped with SIGTERM; clients closing and
Disconnects of the API meanwhile; the lifecycle role and the projector SIGKILLed again and again
throughout. A read_committed consumer sees one opened and one closed per connection with the
right reason, in order; the stalled node's clients are closed with 1012; Get never shows a
fenced connection again; the read model is still the fold of the log, fences included."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conntrack.audit.log import LogReader
from conntrack.audit.rebuild import Rebuild
from conntrack.audit.replay import fold_until
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.settings import Settings
from tests.support.crowd import Crowd
from tests.support.gateway import (
    GatewayProcess,
    api_with_commands,
    get_status,
    status_of,
    verified,
    wait_for_get,
    with_command_topics,
)
from tests.support.kafka import unique
from tests.support.lifecycle import (
    CLOSED,
    LifecycleProcess,
    LifecycleWatcher,
    ToldRecord,
    with_lifecycle_topics,
)
from tests.support.projector import ProjectorProcess

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CONNECTIONS = 2_000
LEASE_S = 3.0
CLOSING = 40  # per node: clients that close, and connections the API disconnects


def kinds(told: list[ToldRecord]) -> list[str]:
    return [str(t.event.WhichOneof("kind")) for t in told]


class Chaos:
    """The projector and the lifecycle role as subprocesses, each SIGKILLed and started again
    at random moments until stop()."""

    def __init__(self, settings: Settings, database_url: str, log_dir: Path) -> None:
        self._settings, self._url, self._dir = settings, database_url, log_dir
        self._rnd = random.Random(11)
        self.projectors: list[ProjectorProcess] = []
        self.roles: list[LifecycleProcess] = []
        self._task: asyncio.Task[None] | None = None

    def _projector(self) -> None:
        log = self._dir / f"projector-{len(self.projectors)}.log"
        self.projectors.append(ProjectorProcess(self._settings, self._url, log, log_level="INFO"))

    def _role(self) -> None:
        log = self._dir / f"lifecycle-{len(self.roles)}.log"
        self.roles.append(LifecycleProcess(self._settings, log))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._rnd.uniform(1.5, 4.0))
            if self._rnd.random() < 0.5:
                self.projectors[-1].kill()
                self._projector()
            else:
                self.roles[-1].kill()
                self._role()

    def start(self) -> None:
        self._projector()
        self._role()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """No more kills; the last processes run on."""
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def close(self) -> None:
        for p in self.projectors:
            p.close()
        for r in self.roles:
            r.close()


async def test_every_end_told_once_through_kills_stalls_and_shutdowns(
    kafka_settings: Settings, database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    rnd = random.Random(27)
    chaos: Chaos | None = None
    async with (
        with_command_topics(kafka_settings) as base,
        with_lifecycle_topics(base, LEASE_S) as settings,
        api_with_commands(settings, engine, lease_seconds=LEASE_S) as system,
        contextlib.AsyncExitStack() as stack,
    ):
        chaos = Chaos(settings, database_url, tmp_path)
        stack.callback(chaos.close)
        chaos.start()
        watcher = await stack.enter_async_context(LifecycleWatcher(settings))
        nodes = {
            role: GatewayProcess(settings, unique(role), tmp_path / f"{role}.log", 0.2)
            for role in ("killed", "stalled", "stopped")
        }
        for node in nodes.values():
            stack.push_async_callback(node.close)
            await node.start()
        crowds = {role: await stack.enter_async_context(Crowd(n.url)) for role, n in nodes.items()}
        held: dict[str, list[str]] = {}
        per_node = CONNECTIONS // len(nodes) + 1
        for role, crowd in crowds.items():
            held[role] = await crowd.open([{} for _ in range(per_node)])
        everyone = {cid for ids in held.values() for cid in ids}
        await watcher.until(lambda told: set(told) >= everyone, within=120)

        # Clients leave and the API disconnects others, on every node.
        leaving = {role: rnd.sample(ids, CLOSING) for role, ids in held.items()}
        rest = {role: [c for c in ids if c not in leaving[role]] for role, ids in held.items()}
        disconnected = {role: rnd.sample(ids, CLOSING) for role, ids in rest.items()}
        for role, crowd in crowds.items():
            await crowd.close(leaving[role])
        for ids in disconnected.values():
            for cid in ids:
                # While the projector is being killed its read model can fall behind the
                # node's heartbeats by more than the (short) lease, and the API then rightly
                # judges the node lost for a moment: Disconnect is tried again once Get finds
                # the connection again.
                for _ in range(20):
                    await wait_for_get(system.stub, cid, "OK", within=120)
                    answer = await status_of(
                        system.stub.Disconnect(svc.DisconnectRequest(connection_id=cid), timeout=30)
                    )
                    if not (answer[0] == "NOT_FOUND" and "gone: node lost" in answer[1]):
                        break
                assert answer == ("OK", ""), answer
        gone_before = {c for role in held for c in leaving[role] + disconnected[role]}

        # The nodes: one SIGTERMed, one SIGKILLed, one SIGSTOPped past the lease.
        assert await nodes["stopped"].terminate() == 0
        await nodes["killed"].kill()
        stalled = nodes["stalled"].process
        assert stalled is not None
        stalled.send_signal(19)  # SIGSTOP
        try:
            lost = {c for role in ("killed", "stalled") for c in held[role]} - gone_before
            await watcher.until(
                lambda told: all(len(told[c]) == 2 for c in lost), within=LEASE_S + 90
            )
        finally:
            stalled.send_signal(18)  # SIGCONT

        # Get never shows a fenced connection again, while the stalled node speaks again.
        fenced = [
            c for c in held["stalled"] if watcher.told[c][1].event.closed.reason == CLOSED.NODE_LOST
        ]
        assert fenced
        loop = asyncio.get_running_loop()
        until = loop.time() + 8
        while loop.time() < until:
            for cid in rnd.sample(fenced, min(50, len(fenced))):
                assert (await get_status(system.stub, cid))[0] == "NOT_FOUND", cid
            await asyncio.sleep(0.2)
        # And its clients were closed with 1012 (service restart), to connect again.
        codes = await crowds["stalled"].closed_by_server()
        for _ in range(150):
            if set(codes) >= set(fenced):
                break
            await asyncio.sleep(0.2)
            codes = await crowds["stalled"].closed_by_server()
        assert {codes.get(c) for c in fenced} == {1012}

        await chaos.stop()
        await watcher.until(
            lambda told: all(len(told.get(c, ())) == 2 for c in everyone), within=120
        )
        told = {c: watcher.told[c] for c in everyone}
        wrong = {c: kinds(ts) for c, ts in told.items() if kinds(ts) != ["opened", "closed"]}
        assert not wrong, list(wrong.items())[:5]
        reasons = {c: ts[1].event.closed.reason for c, ts in told.items()}
        for role in held:
            assert {reasons[c] for c in leaving[role]} == {CLOSED.CLIENT_CLOSED}
            assert {reasons[c] for c in disconnected[role]} == {CLOSED.DISCONNECTED_BY_API}
        stopped_rest = set(held["stopped"]) - gone_before
        assert {reasons[c] for c in stopped_rest} == {CLOSED.GATEWAY_SHUTDOWN}
        assert {reasons[c] for c in lost} == {CLOSED.NODE_LOST}
        assert len(chaos.projectors) + len(chaos.roles) >= 6, "too few kills to mean anything"

        # The read model is still the fold of the log, the fences in it as the stream told them
        # (once the log is quiet: the stalled node, back with a new incarnation, stops).
        assert await nodes["stalled"].terminate() == 0
        verification = await verified(settings, engine, system.store)
        assert verification.ok, verification
        stored = await system.store.nodes()
        for role in ("killed", "stalled"):
            state = stored[nodes[role].node_id]
            incarnation = watcher.told[held[role][0]][0].event.node_incarnation
            assert state.fenced_through >= incarnation, (role, state)
        assert stored[nodes["stopped"].node_id].fenced_through == 0

        # A rebuild from the log gives the same read model, fences included; and the state as of
        # now, replayed from the log, has the same fences.
        states = await system.store.all_states()
        async with LogReader(settings.kafka_bootstrap_servers, settings.events_topic) as reader:
            await Rebuild(engine, reader).run()
        assert await system.store.all_states() == states
        assert await system.store.nodes() == stored
        async with LogReader(settings.kafka_bootstrap_servers, settings.events_topic) as reader:
            as_of = await fold_until(reader, int(time.time() * 1000))
        assert {n: s.fenced_through for n, s in as_of.nodes.items()} == {
            n: s.fenced_through for n, s in stored.items()
        }
