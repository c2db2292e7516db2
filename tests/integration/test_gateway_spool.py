"""Issue #17's must-show, with the real `conntrack-gateway` process and real WebSocket clients on
a private broker this module stops and starts (the shared one must stay up): events that sit in
the gateway's durable spool (CONNTRACK_GATEWAY_SPOOL_DIR) while the broker is down survive a
SIGKILL of the gateway, and the gateway started again on the same directory delivers them, each
connection's in order, none lost.

Get is not the check here: the restarted node announces a new incarnation, so the connections
of the killed one are gone for the API. The log is: every event of every client is in it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect

from conntrack.core.events import (
    Activity,
    Connected,
    Disconnected,
    Event,
    NodeStarted,
    decode,
)
from conntrack.core.settings import Settings
from conntrack.producer.spool_files import SEGMENT_SUFFIX, stored_payloads
from tests.conftest import PrivateBroker
from tests.support.gateway import GatewayProcess, own_id, with_command_topics
from tests.support.kafka import create_topic, read_events, unique

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

DELIVERY_TIMEOUT_S = 2.0


@dataclass
class Client:
    """What one WebSocket client did, as the gateway's events must tell it."""

    connection_id: str
    frames: int = 0
    closed: tuple[int, str] | None = None  # (code, reason) of its own close; None: left open


async def _open(url: str) -> tuple[ClientConnection, Client]:
    ws = await connect(url)
    return ws, Client(own_id(ws))


async def _send(ws: ClientConnection, client: Client, n: int) -> None:
    for i in range(n):
        await ws.send(f"frame {i}")
        client.frames += 1


async def _close(ws: ClientConnection, client: Client, code: int, reason: str) -> None:
    await ws.close(code, reason)
    client.closed = (code, reason)


def _first_seen(events: Iterable[Event], connection_id: str) -> list[Event]:
    """The connection's events in the order they first appear (a replayed copy of an event that
    was delivered after all is a later duplicate, which the fold ignores)."""
    seen: set[str] = set()
    mine: list[Event] = []
    for event in events:
        if event.connection_id == connection_id and event.event_id not in seen:
            seen.add(event.event_id)
            mine.append(event)
    return mine


def _told(events: Iterable[Event], client: Client, *, since_frames: int = 0) -> bool:
    """Whether the events hold the client's whole story: its Connected (unless since_frames: a
    story that started before), activity summing to its frames, and its close if it closed."""
    mine = _first_seen(events, client.connection_id)
    frames = sum(e.payload.frames for e in mine if isinstance(e.payload, Activity))
    connected = any(isinstance(e.payload, Connected) for e in mine)
    closed = [
        (e.payload.status_code, e.payload.reason)
        for e in mine
        if isinstance(e.payload, Disconnected)
    ]
    return (
        (connected or since_frames > 0)
        and frames == client.frames - since_frames
        and closed == ([client.closed] if client.closed else [])
    )


def _spooled(spool_dir: Path) -> list[Event]:
    return [decode(payload) for payload in stored_payloads(spool_dir)]


async def _until_in_topic(
    bootstrap: str, topic: str, what: str, check: Callable[[list[Event]], bool], within: float = 120
) -> list[Event]:
    """Read the whole topic again and again until check accepts it; returns what was read."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        events = await read_events(bootstrap, topic, partitions=3)
        if check(events):
            return events
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what}: not in the topic within {within} s")
        await asyncio.sleep(0.2)


async def _until_spooled(
    spool_dir: Path, what: str, check: Callable[[list[Event]], bool], within: float = 60
) -> list[Event]:
    """Read the spool's segment files until check accepts what they hold (written: a SIGKILL
    from now on does not lose it); returns what they hold."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        events = _spooled(spool_dir)
        if check(events):
            return events
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what}: not in the spool within {within} s; it holds {len(events)}")
        await asyncio.sleep(0.1)


async def test_the_gateway_killed_with_events_in_its_spool_delivers_them_after_a_restart(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    await private_broker.up()
    bootstrap = private_broker.bootstrap
    events_topic = unique("events")
    await create_topic(bootstrap, events_topic, 3)
    spool_dir = tmp_path / "spool"
    node_id = unique("gw-spool")
    base = Settings(
        kafka_bootstrap_servers=bootstrap,
        events_topic=events_topic,
        gateway_spool_dir=spool_dir,
        gateway_delivery_timeout_seconds=DELIVERY_TIMEOUT_S,
    )
    broker_down = False
    async with with_command_topics(base) as settings:
        first = GatewayProcess(settings, node_id, tmp_path / "first.log", heartbeat_seconds=1)
        try:
            await first.start()
            # Live: a client comes and goes, another stays into the outage.
            ws_a, a = await _open(first.url)
            await _send(ws_a, a, 3)
            await _close(ws_a, a, 1000, "done")
            ws_b, b = await _open(first.url)
            await _send(ws_b, b, 2)
            await _until_in_topic(
                bootstrap,
                events_topic,
                "the live clients' events",
                lambda got: _told(got, a) and _told(got, b),
            )
            assert list(spool_dir.glob("*" + SEGMENT_SUFFIX)) == []  # delivered live
            b_live_frames = b.frames

            await private_broker.down()
            broker_down = True
            # The outage: the open client sends and leaves, new ones come, send and leave, one
            # stays open (the kill ends its socket: it never gets a Disconnected).
            await _send(ws_b, b, 2)
            await _close(ws_b, b, 4000, "bye")
            outage: list[Client] = []
            for i in range(4):
                ws, client = await _open(first.url)
                await _send(ws, client, i + 1)
                await _close(ws, client, 1000 + i, f"left {i}")
                outage.append(client)
            ws_d, d = await _open(first.url)
            await _send(ws_d, d, 3)
            outage.append(d)

            held = await _until_spooled(
                spool_dir,
                "the outage's events",
                lambda got: (
                    _told(got, b, since_frames=b_live_frames) and all(_told(got, c) for c in outage)
                ),
                within=DELIVERY_TIMEOUT_S * 10 + 30,
            )
            await first.kill()  # no stop, no flush: what is on disk is all there is
            assert first.process is not None
            assert first.process.returncode == -signal.SIGKILL
            with contextlib.suppress(Exception):
                await ws_d.close()
            assert "Traceback" not in first.log(), first.log()
        finally:
            await first.close()
        # Nothing the kill interrupted took a record away.
        spooled = _spooled(spool_dir)
        assert {e.event_id for e in held} <= {e.event_id for e in spooled}
        spooled_ids = {e.event_id for e in spooled if e.connection_id}

        await private_broker.up()
        broker_down = False
        second = GatewayProcess(settings, node_id, tmp_path / "second.log", heartbeat_seconds=1)
        try:
            await second.start()
            clients = [a, b, *outage]
            got = await _until_in_topic(
                bootstrap,
                events_topic,
                "every client's events after the restart",
                lambda got: all(_told(got, c) for c in clients),
            )
            assert await second.terminate() == 0
        finally:
            await second.close()
        second_log = second.log()
        # The restarted process found every record the killed one had written, none acknowledged.
        assert f"holds {len(spooled)} event(s) from before" in second_log, second_log
        assert "the spool is delivered" in second_log, second_log
        assert "Traceback" not in second_log, second_log
        assert list(spool_dir.glob("*" + SEGMENT_SUFFIX)) == []  # all acknowledged

    # Every event the spool held is in the topic; each connection's events in their order.
    assert spooled_ids <= {e.event_id for e in got}
    unique_events = {e.event_id: e for e in got}.values()  # a replayed copy counts once
    starts = [e.payload for e in unique_events if isinstance(e.payload, NodeStarted)]
    assert [s.node_id for s in starts] == [node_id, node_id]
    assert starts[0].incarnation < starts[1].incarnation
    for client in clients:
        mine = _first_seen(got, client.connection_id)
        kinds = [e.kind for e in mine]
        last = ["disconnected"] if client.closed else []
        assert kinds == ["connected"] + ["activity"] * (len(kinds) - 1 - len(last)) + last, kinds
        times = [e.occurred_at_ns for e in mine]
        assert times == sorted(times), f"{client.connection_id}: out of order"
        connected = mine[0].payload
        assert isinstance(connected, Connected)
        assert (connected.node_id, connected.node_incarnation) == (node_id, starts[0].incarnation)
    assert not broker_down
