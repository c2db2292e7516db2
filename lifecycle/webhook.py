"""The webhook sink (`conntrack-lifecycle webhook`): the lifecycle topic as HTTP POSTs, for
backends without Kafka (docs/lifecycle.md, "Webhook").

Each lifecycle event is POSTed as a CloudEvent in structured JSON mode (content type
application/cloudevents+json: the attributes of the Kafka record's ce_ headers, `data` the
LifecycleEvent in protobuf's JSON mapping), signed with HMAC-SHA256 of the body under the shared
secret (X-Conntrack-Signature: sha256=<hex>). A 2xx answer delivers it; a 5xx, 408, 429, a
timeout or a refused connection is tried again with exponential backoff, up to
webhook_max_attempts; any other answer, or the last failed attempt, sends the record to the
dead-letter topic with why (and the sink moves on). A connection's events are POSTed one after
the other, in their order; different connections' at once (webhook_concurrency). Offsets are
committed once every record before them is delivered or dead-lettered: delivery is at least once
(after a crash or a rebalance some events are POSTed again; ce_id tells them apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from google.protobuf.json_format import MessageToDict
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
)

from conntrack.core import aiokafka_internals, kafka
from conntrack.core.kafka import KafkaConnection
from conntrack.core.process_metrics import add_process_collectors
from conntrack.core.retry import Abandoned, Backoff, one_line
from conntrack.core.settings import Settings
from conntrack.lifecycle.records import decode_lifecycle
from conntrack.producer.topics import TopicSpec, broker_count, default_replication, ensure_topics

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-Conntrack-Signature"
CONTENT_TYPE: Final = "application/cloudevents+json; charset=utf-8"
_RETRIED_STATUSES: Final = frozenset({408, 429})
_FIRST_BACKOFF_S: Final = 0.5
_MAX_RECORDS: Final = 500
_TOPIC_WAIT_S: Final = 5.0


def signature(secret: bytes, body: bytes) -> str:
    """The X-Conntrack-Signature value of a body: how a receiver checks it (compare with
    hmac.compare_digest)."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def cloud_event_body(headers: Sequence[tuple[str, bytes]], value: bytes) -> bytes:
    """A lifecycle record as a structured-mode CloudEvent (JSON)."""
    attributes = {name[3:]: raw.decode() for name, raw in headers if name.startswith("ce_")}
    event = {
        **attributes,
        "datacontenttype": "application/json",
        "data": MessageToDict(decode_lifecycle(value), preserving_proto_field_name=True),
    }
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        add_process_collectors(r, "webhook")
        self.attempts = Counter(
            "conntrack_webhook_attempts",
            "POSTs to the webhook, by outcome (delivered, retried, refused).",
            ["outcome"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "conntrack_webhook_dead_lettered",
            "Lifecycle events sent to the webhook's dead-letter topic.",
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "conntrack_webhook_delivery_seconds",
            "From the first POST of an event to its delivery (retries included).",
            registry=r,
        )


@dataclass(frozen=True, slots=True)
class _Failure:
    error: str
    attempts: int


class WebhookSink:
    """Reads the lifecycle topic (read_committed, in a consumer group) and POSTs each event to
    webhook_url, signed, retried with backoff; what the receiver will not take goes to the
    dead-letter topic. At least once, in order per connection."""

    def __init__(self, settings: Settings, metrics: WebhookMetrics | None = None) -> None:
        if not settings.webhook_url:
            raise ValueError("webhook_url is not set")
        self._settings = settings
        self._url = settings.webhook_url
        secret = settings.webhook_secret
        self._secret = secret.get_secret_value().encode() if secret is not None else None
        self._kafka = KafkaConnection.from_settings(settings, "webhook")
        self._backoff = Backoff(settings.webhook_max_backoff_seconds, _FIRST_BACKOFF_S)
        self.metrics = metrics or WebhookMetrics()
        self._stopping = asyncio.Event()
        self.delivered = 0

    async def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Until stop(). Raises Abandoned if stopped before the broker could be reached."""
        s = self._settings
        consumer, dead_letters = await self._connect()
        timeout = aiohttp.ClientTimeout(total=s.webhook_timeout_seconds)
        try:
            consumer.subscribe([s.lifecycle_topic])
            async with aiohttp.ClientSession(timeout=timeout) as http:
                while not self._stopping.is_set():
                    data = await consumer.getmany(timeout_ms=500, max_records=_MAX_RECORDS)
                    if not data:
                        continue
                    delivering = asyncio.create_task(self._deliver_all(http, dead_letters, data))
                    stop = asyncio.create_task(self._stopping.wait())
                    await asyncio.wait({delivering, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if not delivering.done():
                        # Stopped mid-delivery: nothing is committed, so the next run POSTs
                        # these again (at least once).
                        delivering.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await delivering
                        return
                    stop.cancel()
                    delivering.result()
                    await consumer.commit(
                        {tp: records[-1].offset + 1 for tp, records in data.items()}
                    )
        finally:
            await kafka.close(consumer, dead_letters)

    async def _connect(self) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
        """Started clients (fresh ones for every attempt: an aiokafka client cannot start again
        after a failed start), the dead-letter topic provisioned, the lifecycle topic there."""
        s = self._settings
        delays = self._backoff.delays()
        said_waiting = False
        while True:
            consumer = AIOKafkaConsumer(
                **self._kafka.options(),
                group_id=s.webhook_group,
                enable_auto_commit=False,
                isolation_level="read_committed",
                auto_offset_reset="earliest",
            )
            dead_letters = AIOKafkaProducer(
                **self._kafka.options(), acks="all", enable_idempotence=True
            )
            try:
                await kafka.start(consumer, self._kafka)
                await kafka.start(dead_letters, self._kafka)
                replication, min_isr = default_replication(await broker_count(self._kafka))
                await ensure_topics(
                    self._kafka, [TopicSpec(s.webhook_dead_letter_topic, 1, replication, min_isr)]
                )
                while not await aiokafka_internals.topic_partitions(consumer, s.lifecycle_topic):
                    if not said_waiting:
                        log.warning(
                            "event=waiting_for_topic topic=%s: conntrack-lifecycle creates it "
                            "on its first start",
                            s.lifecycle_topic,
                        )
                        said_waiting = True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), _TOPIC_WAIT_S)
                    if self._stopping.is_set():
                        raise Abandoned("topic")
                return consumer, dead_letters
            except (KafkaError, OSError) as exc:
                await kafka.close(consumer, dead_letters)
                if self._stopping.is_set():
                    raise Abandoned("broker") from exc
                delay = next(delays)
                log.warning("event=retry cause=broker delay_s=%.1f error=%r", delay, one_line(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    raise Abandoned("broker") from exc
            except BaseException:
                await kafka.close(consumer, dead_letters)
                raise

    async def _deliver_all(
        self,
        http: aiohttp.ClientSession,
        dead_letters: AIOKafkaProducer,
        data: dict[TopicPartition, list[Any]],
    ) -> None:
        """Every record, each connection's in order, webhook_concurrency connections at once."""
        by_connection: dict[bytes, list[Any]] = {}
        for records in data.values():
            for r in records:
                by_connection.setdefault(r.key, []).append(r)
        room = asyncio.Semaphore(self._settings.webhook_concurrency)

        async def one_connection(records: list[Any]) -> None:
            async with room:
                for r in records:
                    failure = await self._deliver(http, r)
                    if failure is not None:
                        await self._dead_letter(dead_letters, r, failure)

        await asyncio.gather(*(one_connection(rs) for rs in by_connection.values()))

    async def _deliver(self, http: aiohttp.ClientSession, record: Any) -> _Failure | None:
        """POST one record until delivered; the failure that ends the attempts, or None."""
        body = cloud_event_body(record.headers, record.value)
        headers = {"Content-Type": CONTENT_TYPE}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = signature(self._secret, body)
        delays = self._backoff.delays()
        began = time.monotonic()
        attempts = self._settings.webhook_max_attempts
        for attempt in range(1, attempts + 1):
            try:
                async with http.post(self._url, data=body, headers=headers) as answer:
                    status = answer.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}".strip(": ")
            else:
                if 200 <= status < 300:
                    self.metrics.attempts.labels("delivered").inc()
                    self.metrics.delivery_seconds.observe(time.monotonic() - began)
                    self.delivered += 1
                    return None
                error = f"HTTP {status}"
                if status < 500 and status not in _RETRIED_STATUSES:
                    self.metrics.attempts.labels("refused").inc()
                    return _Failure(f"{error}: refused, not retried", attempt)
            self.metrics.attempts.labels("retried").inc()
            if attempt < attempts:
                log.debug("event=webhook_retry attempt=%d error=%s", attempt, error)
                await asyncio.sleep(next(delays))
        return _Failure(error, attempts)

    async def _dead_letter(
        self, dead_letters: AIOKafkaProducer, record: Any, failure: _Failure
    ) -> None:
        headers = [
            *record.headers,
            ("webhook-error", failure.error.encode()),
            ("webhook-attempts", str(failure.attempts).encode()),
            ("source-topic", record.topic.encode()),
            ("source-partition", str(record.partition).encode()),
            ("source-offset", str(record.offset).encode()),
        ]
        future = await dead_letters.send(
            self._settings.webhook_dead_letter_topic,
            key=record.key,
            value=record.value,
            headers=headers,
        )
        await future
        self.metrics.dead_lettered.inc()
        log.warning(
            "event=webhook_dead_letter partition=%d offset=%d attempts=%d error=%s",
            record.partition,
            record.offset,
            failure.attempts,
            failure.error,
        )
