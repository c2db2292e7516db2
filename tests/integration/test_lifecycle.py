"""The lifecycle role on the real broker with real gateway nodes and WebSocket clients: each
connection told opened and closed once with its reason and CloudEvents headers; a SIGKILLed
node fenced within the lease and two heartbeats; a stalled node fenced, told, and back with a
new incarnation; the role SIGKILLed again and again without a record lost or told twice."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path

import pytest
from cloudevents.kafka import KafkaMessage, from_binary
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conntrack.core.events import Connected, Disconnected, Event
from conntrack.core.settings import Settings
from conntrack.lifecycle.records import TYPES, event_id
from tests.support.events import as_records
from tests.support.gateway import gateway_node, own_id, with_command_topics
from tests.support.kafka import publish
from tests.support.lifecycle import (
    CLOSED,
    LifecycleProcess,
    assert_told_once,
    kill_in_a_transaction,
    lifecycle_role,
    read_lifecycle,
    with_lifecycle_topics,
)
from tests.support.ports import free_port
from tests.support.projector import scrape

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SECOND = 1_000_000_000
LEASE_S = 3.0
HEARTBEAT_S = 0.2


async def told_until(settings: Settings, done: object, within: float = 60) -> dict[str, list]:  # type: ignore[type-arg]
    """Read the lifecycle topic until done(each) holds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        each = assert_told_once(await read_lifecycle(settings, idle_s=0.2))
        if done(each):  # type: ignore[operator]
            return each
        assert asyncio.get_running_loop().time() < deadline, {
            cid: [t.event.WhichOneof("kind") for t in ts] for cid, ts in each.items()
        }
        await asyncio.sleep(0.3)


async def test_each_connection_is_told_with_its_reason_and_a_killed_node_is_fenced_in_time(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    async with (
        with_command_topics(kafka_settings) as base,
        with_lifecycle_topics(base, LEASE_S) as settings,
        lifecycle_role(settings),
        gateway_node(settings, "stays", tmp_path / "stays.log", HEARTBEAT_S) as stays,
        gateway_node(settings, "stops", tmp_path / "stops.log", HEARTBEAT_S) as stops,
        gateway_node(settings, "dies", tmp_path / "dies.log", HEARTBEAT_S) as dies,
        contextlib.AsyncExitStack() as clients,
    ):
        leaving = await clients.enter_async_context(connect(stays.url))
        staying = await clients.enter_async_context(connect(stays.url))
        stopped = await clients.enter_async_context(connect(stops.url))
        killed = [await clients.enter_async_context(connect(dies.url)) for _ in range(5)]
        ids = {
            "leaving": own_id(leaving),
            "staying": own_id(staying),
            "stopped": own_id(stopped),
        }
        killed_ids = {own_id(c) for c in killed}
        everyone = set(ids.values()) | killed_ids
        await told_until(settings, lambda each: set(each) >= everyone)

        await leaving.close(4001, "done here")
        assert await stops.terminate() == 0
        await dies.kill()
        killed_at = time.monotonic()
        each = await told_until(
            settings,
            lambda each: all(len(each[c]) == 2 for c in everyone - {ids["staying"]}),
            within=LEASE_S + 30,
        )
        fenced_after = time.monotonic() - killed_at

        closed = {cid: ts[1].event.closed for cid, ts in each.items() if len(ts) == 2}
        assert (closed[ids["leaving"]].reason, closed[ids["leaving"]].status_code) == (
            CLOSED.CLIENT_CLOSED,
            4001,
        )
        assert closed[ids["leaving"]].reason_text == "done here"
        assert closed[ids["stopped"]].reason == CLOSED.GATEWAY_SHUTDOWN
        assert {closed[c].reason for c in killed_ids} == {CLOSED.NODE_LOST}
        assert len(each[ids["staying"]]) == 1
        # Within the lease and two heartbeats of the kill (and the role's commit interval).
        assert fenced_after <= LEASE_S + 2 * HEARTBEAT_S + 2.0, fenced_after

        # The records: keyed by connection, with the CloudEvents binding's headers.
        opened = each[ids["staying"]][0]
        assert opened.key == ids["staying"].encode()
        assert opened.event.gateway_id == settings.gateway_id
        assert opened.event.node_id == "stays"
        assert opened.event.opened.source_ip == "127.0.0.1"
        # Read as the CloudEvents SDK reads a Kafka record (binary mode).
        cloud_event = from_binary(
            KafkaMessage(headers=opened.headers, key=opened.key, value=b""),
            data_unmarshaller=lambda b: b,
        )
        assert cloud_event["type"] == TYPES["opened"]
        assert cloud_event["id"] == opened.event.event_id == event_id("opened", ids["staying"])
        assert cloud_event["source"] == f"/conntrack/gateways/{settings.gateway_id}"
        assert cloud_event["subject"] == ids["staying"]
        assert cloud_event["datacontenttype"] == "application/x-protobuf"
        lost = each[next(iter(killed_ids))][1]
        assert lost.headers["ce_type"] == TYPES["closed"].encode()
        assert (
            lost.event.occurred_at.ToNanoseconds()
            >= each[next(iter(killed_ids))][0].event.occurred_at.ToNanoseconds()
        )


async def test_a_stalled_node_is_fenced_closes_its_sockets_with_1012_and_comes_back_anew(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    async with (
        with_command_topics(kafka_settings) as base,
        with_lifecycle_topics(base, LEASE_S) as settings,
        lifecycle_role(settings),
        gateway_node(settings, "stalls", tmp_path / "stalls.log", HEARTBEAT_S) as node,
    ):
        async with connect(node.url) as client:
            first = own_id(client)
            await told_until(settings, lambda each: first in each)
            assert node.process is not None
            node.process.send_signal(19)  # SIGSTOP
            try:
                each = await told_until(
                    settings, lambda each: len(each[first]) == 2, within=LEASE_S + 30
                )
            finally:
                node.process.send_signal(18)  # SIGCONT
            assert each[first][1].event.closed.reason == CLOSED.NODE_LOST
            # Back, the node learns it was fenced and closes the socket for the client to
            # connect again.
            await asyncio.wait_for(client.wait_closed(), 30)
            assert client.close_code == 1012
        # A new client of the same node: a new incarnation, told opened and left open.
        async with connect(node.url) as again:
            second = own_id(again)
            each = await told_until(settings, lambda each: second in each)
            assert each[second][0].event.node_incarnation > each[first][0].event.node_incarnation
            await asyncio.sleep(LEASE_S + 1)
            each = await told_until(settings, lambda each: True)
            assert len(each[second]) == 1, "the new incarnation must not be fenced"
            assert len(each[first]) == 2
    assert "event=node_fenced" in node.log()


async def test_the_gateway_closes_idle_and_old_sockets_and_says_why(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    metrics_port = free_port()
    limits = {
        "CONNTRACK_GATEWAY_IDLE_TIMEOUT_SECONDS": "1",
        "CONNTRACK_GATEWAY_MAX_LIFETIME_SECONDS": "3",
        "CONNTRACK_METRICS_PORT": str(metrics_port),
    }
    async with (
        with_command_topics(kafka_settings) as base,
        with_lifecycle_topics(base, LEASE_S) as settings,
        lifecycle_role(settings),
        gateway_node(settings, "limits", tmp_path / "limits.log", HEARTBEAT_S, limits) as node,
        connect(node.url) as quiet,
        connect(node.url) as chatty,
    ):
        opened = time.monotonic()

        async def chat() -> None:
            while True:
                await chatty.send("still here")
                await asyncio.sleep(0.2)

        chatting = asyncio.create_task(chat())
        await asyncio.wait_for(quiet.wait_closed(), 10)
        quiet_after = time.monotonic() - opened
        await asyncio.wait_for(chatty.wait_closed(), 10)
        chatty_after = time.monotonic() - opened
        chatting.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await chatting
        each = await told_until(
            settings, lambda each: all(len(each.get(own_id(c), ())) == 2 for c in (quiet, chatty))
        )
        # The node's metrics say the same.
        metrics = await scrape(metrics_port)
    assert (quiet.close_code, quiet.close_reason) == (1001, "idle timeout")
    assert (chatty.close_code, chatty.close_reason) == (1001, "maximum lifetime")
    assert 0.8 <= quiet_after < 3, quiet_after
    assert 2.8 <= chatty_after < 6, chatty_after
    assert each[own_id(quiet)][1].event.closed.reason == CLOSED.IDLE_TIMEOUT
    assert each[own_id(chatty)][1].event.closed.reason == CLOSED.MAX_LIFETIME
    assert each[own_id(chatty)][1].event.closed.status_code == 1001
    assert metrics[("conntrack_gateway_sockets_closed_total", (("why", "idle_timeout"),))] == 1
    assert metrics[("conntrack_gateway_sockets_closed_total", (("why", "max_lifetime"),))] == 1
    assert metrics[("conntrack_gateway_open_sockets", ())] == 0
    assert metrics[("conntrack_gateway_frames_received_total", ())] >= 10
    assert metrics[("conntrack_publisher_events_delivered_total", ())] >= 4
    assert metrics[("conntrack_publisher_heartbeats_total", (("outcome", "delivered"),))] >= 1
    assert metrics[("conntrack_publisher_in_flight", ())] == 0
    delivered = metrics[("conntrack_publisher_events_delivered_total", ())]
    assert metrics[("conntrack_publisher_delivery_seconds_count", ())] == delivered
    build = [dict(k[1]) for k in metrics if k[0] == "conntrack_build_info"]
    assert [b["component"] for b in build] == ["gateway"]


async def test_told_exactly_once_while_the_role_is_killed_again_and_again(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """A backlog the role works through in transaction after transaction, and more events
    arriving, while it is SIGKILLed at random moments (mid-transaction among them); a
    read_committed consumer sees each connection told exactly once."""
    rnd = random.Random(7)
    async with (
        with_command_topics(kafka_settings) as base,
        with_lifecycle_topics(base, LEASE_S) as settings,
    ):
        t0 = time.time_ns()
        connections = [f"c{i:05d}" for i in range(30_000)]
        events = []
        for i, cid in enumerate(connections):
            at = t0 + i * 1000
            events.append(Event(f"{cid}-c", cid, "gw-k", at, Connected("10.0.0.1", "ua")))
            if i % 3:
                events.append(Event(f"{cid}-d", cid, "gw-k", at + 500, Disconnected(1000, "", 1)))
        # A backlog, then events arriving all through the kills (the rounds need the role busy).
        backlog, more = events[: len(events) // 2], events[len(events) // 2 :]
        bootstrap = settings.kafka_bootstrap_servers
        await publish(bootstrap, settings.events_topic, as_records(backlog))

        async def feed() -> None:
            for i in range(0, len(more), 500):
                await publish(bootstrap, settings.events_topic, as_records(more[i : i + 500]))
                await asyncio.sleep(0.2)

        feeding = asyncio.create_task(feed())
        processes: list[LifecycleProcess] = []
        try:
            for round_ in range(6):
                process = LifecycleProcess(settings, tmp_path / f"lifecycle-{len(processes)}.log")
                processes.append(process)
                await process.started()
                if round_ % 2:
                    await asyncio.sleep(rnd.uniform(0.1, 1.0))
                    process.kill()
                else:  # while it writes: its transaction is open
                    await kill_in_a_transaction(settings, process)
            await feeding
            last = LifecycleProcess(settings, tmp_path / "lifecycle-last.log")
            processes.append(last)
            each = await told_until(
                settings,
                lambda each: (
                    len(each) == len(connections)
                    and sum(len(ts) for ts in each.values()) == len(events)
                ),
                within=180,
            )
            await last.started()
            assert await last.terminate() == 0
        finally:
            feeding.cancel()
            for p in processes:
                p.close()
        assert set(each) == set(connections)
        for i, cid in enumerate(connections):
            kinds = [t.event.WhichOneof("kind") for t in each[cid]]
            assert kinds == (["opened", "closed"] if i % 3 else ["opened"]), (cid, kinds)
        # Kills landed mid-transaction: what those wrote is in the log, never committed.
        written = await read_lifecycle(settings, committed=False, idle_s=0.2)
        assert len(written) > len(events), "no kill landed mid-transaction"
