"""The webhook sink against a real local HTTP receiver that fails 30 % of requests and is down
for 20 s: every lifecycle event delivered, every request signed, each connection's events in
order; a receiver that refuses an event sends it to the dead-letter topic."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cloudevents.http import from_http
from pydantic import SecretStr

from conntrack.core.events import Connected, Disconnected, Event
from conntrack.core.settings import Settings
from conntrack.lifecycle.webhook import SIGNATURE_HEADER, WebhookSink, signature
from tests.support.events import as_records
from tests.support.gateway import with_command_topics
from tests.support.kafka import publish, read_all, unique
from tests.support.lifecycle import lifecycle_role, read_lifecycle, with_lifecycle_topics
from tests.support.ports import free_port

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SECRET = "s3cret-for-tests"


@dataclass
class Receiver:
    """An HTTP endpoint that answers 503 to a share of requests, and can be taken down."""

    port: int
    fail_share: float
    rnd: random.Random = field(default_factory=lambda: random.Random(30))
    accepted: list[dict[str, object]] = field(default_factory=list)
    requests: int = 0
    bad_signatures: int = 0
    refuse_type: str | None = None
    _runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        if request.headers.get(SIGNATURE_HEADER) != signature(SECRET.encode(), body):
            self.bad_signatures += 1
            return web.Response(status=401)
        # Read as the CloudEvents SDK reads a structured-mode request.
        cloud_event = from_http(dict(request.headers), body)
        event = {**cloud_event.get_attributes(), "data": cloud_event.data}
        if event["type"] == self.refuse_type:
            return web.Response(status=422)
        if self.rnd.random() < self.fail_share:
            return web.Response(status=503)
        self.accepted.append(event)
        return web.Response(status=204)

    async def up(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def down(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
        self._runner = None


@contextlib.asynccontextmanager
async def sink(settings: Settings) -> AsyncIterator[WebhookSink]:
    webhook = WebhookSink(settings)
    task = asyncio.create_task(webhook.run())
    try:
        yield webhook
    finally:
        await webhook.stop()
        await asyncio.wait_for(task, 60)


def dead_lettered(webhook: WebhookSink) -> float:
    return webhook.metrics.registry.get_sample_value("conntrack_webhook_dead_lettered_total") or 0


def history(connections: int) -> list[Event]:
    t0 = time.time_ns()
    events = []
    for i in range(connections):
        cid = f"w{i:04d}"
        events.append(Event(f"{cid}-c", cid, "gw-w", t0 + i, Connected("10.1.1.1", "ua")))
        events.append(Event(f"{cid}-d", cid, "gw-w", t0 + i + 10, Disconnected(1000, "", 1)))
    return events


async def test_every_event_delivered_signed_and_in_order_through_failures_and_an_outage(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    receiver = Receiver(free_port(), fail_share=0.3)
    await receiver.up()
    async with (
        with_command_topics(kafka_settings) as base,
        with_lifecycle_topics(base) as lifecycle_settings,
    ):
        settings = lifecycle_settings.model_copy(
            update={
                "webhook_url": f"http://127.0.0.1:{receiver.port}/hook",
                "webhook_secret": SecretStr(SECRET),
                "webhook_group": unique("webhook"),
                "webhook_max_attempts": 40,
                "webhook_max_backoff_seconds": 2.0,
                "webhook_timeout_seconds": 2.0,
            }
        )
        events = history(300)
        await publish(settings.kafka_bootstrap_servers, settings.events_topic, as_records(events))
        async with lifecycle_role(settings), sink(settings) as webhook:
            told = await read_lifecycle(settings)
            for _ in range(60):
                if len(told) == len(events):
                    break
                told = await read_lifecycle(settings)
            assert len(told) == len(events)
            deadline = asyncio.get_running_loop().time() + 60
            while len(receiver.accepted) < len(events) // 4:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
            await receiver.down()
            await asyncio.sleep(20)
            await receiver.up()
            expected = {t.event.event_id for t in told}
            deadline = asyncio.get_running_loop().time() + 120
            while {e["id"] for e in receiver.accepted} != expected:
                assert asyncio.get_running_loop().time() < deadline, (
                    len({e["id"] for e in receiver.accepted}),
                    len(expected),
                )
                await asyncio.sleep(0.2)
        await receiver.down()
        assert dead_lettered(webhook) == 0
    assert receiver.bad_signatures == 0
    assert receiver.requests > len(events) * 1.2, "the failures must have made it retry"
    # Each connection's events arrive in order (a retried one may arrive again, never early).
    first_seen: dict[str, list[str]] = {}
    seen_ids: set[str] = set()
    for e in receiver.accepted:
        if e["id"] in seen_ids:
            continue
        seen_ids.add(str(e["id"]))
        first_seen.setdefault(str(e["subject"]), []).append(str(e["type"]).split(".")[-2])
    assert len(first_seen) == len(events) // 2
    assert all(v == ["opened", "closed"] for v in first_seen.values())
    sample = receiver.accepted[0]
    assert sample["specversion"] == "1.0"
    assert sample["datacontenttype"] == "application/json"
    assert sample["source"] == "/conntrack/gateways/gw-w"
    assert sample["data"]["connection_id"] == sample["subject"]  # type: ignore[index]


async def test_an_event_the_receiver_refuses_goes_to_the_dead_letter_topic(
    kafka_settings: Settings,
) -> None:
    receiver = Receiver(
        free_port(), fail_share=0.0, refuse_type="dev.conntrack.connection.closed.v1"
    )
    await receiver.up()
    async with (
        with_command_topics(kafka_settings) as base,
        with_lifecycle_topics(base) as lifecycle_settings,
    ):
        dlq = unique("webhook-dlq")
        settings = lifecycle_settings.model_copy(
            update={
                "webhook_url": f"http://127.0.0.1:{receiver.port}/hook",
                "webhook_secret": SecretStr(SECRET),
                "webhook_group": unique("webhook"),
                "webhook_dead_letter_topic": dlq,
            }
        )
        events = history(5)
        await publish(settings.kafka_bootstrap_servers, settings.events_topic, as_records(events))
        async with lifecycle_role(settings), sink(settings) as webhook:
            deadline = asyncio.get_running_loop().time() + 60
            while dead_lettered(webhook) < 5:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.1)
        await receiver.down()
        letters = await read_all(settings.kafka_bootstrap_servers, dlq, partitions=1)
    assert len(letters) == 5
    assert len(receiver.accepted) == 5  # the opened ones
    headers = dict(letters[0].headers)
    assert headers["webhook-error"].startswith(b"HTTP 422")
    assert headers["webhook-attempts"] == b"1"
    assert headers["source-topic"] == settings.lifecycle_topic.encode()
    assert headers["ce_type"] == b"dev.conntrack.connection.closed.v1"
