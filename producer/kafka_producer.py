"""The publisher's aiokafka producer: made with the options that keep per-connection order and
no duplicates, connected with retries until a deadline (its metadata requests spaced, see
core/aiokafka_internals.py), the topic checked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from conntrack.core import kafka, tracing
from conntrack.core.aiokafka_internals import back_off_metadata_requests
from conntrack.core.events import HEADERS
from conntrack.core.kafka import KafkaConnection
from conntrack.producer.errors import BrokerUnavailableError, TopicNotFoundError

log = logging.getLogger(__name__)

# aiokafka holds one batch per partition and send() waits while it is full and cannot be sent
# (its leader is away: a broker failover takes about 10 s). Its default, 16 KiB (some 160
# events), made calls wait within a second of a failover; 1 MiB (the broker's default
# message.max.bytes is 1 MiB + 12 bytes, so a full batch is still accepted) holds some 7,000
# events of the partition: docs/producer.md, "Failure behaviour".
MAX_BATCH_BYTES: Final = 1 << 20
CONNECT_BACKOFF_S: Final = 0.5
RETRY_NOTICE_S: Final = 60.0
# Between two metadata requests of one producer: retry.backoff.ms after an answer, and after a
# failure an exponential backoff like the Java client's reconnect.backoff.ms/.max.ms.
_METADATA_BACKOFF_S: Final = 0.1
_RECONNECT_BACKOFF_S: Final = 0.05
_RECONNECT_BACKOFF_MAX_S: Final = 1.0


def options(linger_ms: int, delivery_timeout_s: float, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The producer's options: the publisher's defaults, the caller's `extra` aiokafka options
    over them, and what per-connection order and no duplicates need over everything."""
    if "partitioner" in extra:
        raise ValueError(
            "partitioner: the publisher places each connection's events itself, by its id "
            "as Kafka's default partitioner does (producer/lanes.py)"
        )
    return {
        "linger_ms": linger_ms,
        "max_batch_size": MAX_BATCH_BYTES,
        # aiokafka uses it for metadata waits, full-buffer waits and produce requests.
        "request_timeout_ms": max(1, int(delivery_timeout_s * 1000)),
        **extra,
        # Not overridable: these are what make per-connection order and no-duplicates hold.
        "acks": "all",
        "enable_idempotence": True,
    }


async def connect(
    connection: KafkaConnection,
    options: Mapping[str, Any],
    topic: str,
    *,
    deadline: float,
    timeout_s: float,
    retry_log_level: int = logging.WARNING,
) -> Any:
    """A started producer whose metadata knows `topic`, retrying until `deadline` (loop time);
    BrokerUnavailableError after it (`timeout_s`: the wait, for the message),
    TopicNotFoundError for a topic the broker does not have."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    told_at: float | None = None  # when the operator was last told it is unreachable
    while True:
        producer = AIOKafkaProducer(**{**connection.options(), **options})
        back_off_metadata_requests(producer.client)
        try:
            async with asyncio.timeout_at(deadline):
                await kafka.start(producer, connection)
                await _check_topic(producer, topic, connection.bootstrap_servers)
            return producer
        except (KafkaConnectionError, TimeoutError) as exc:
            await producer.stop()
            if loop.time() + CONNECT_BACKOFF_S >= deadline:
                raise BrokerUnavailableError(
                    f"cannot reach Kafka at {connection.bootstrap_servers} within "
                    f"{timeout_s:g} s: {exc or type(exc).__name__}"
                ) from exc
            # Said once, then every RETRY_NOTICE_S (each attempt only at DEBUG): a broker that
            # stays away for minutes is one line a minute, not two a second.
            now = loop.time()
            tell = told_at is None or now - told_at >= RETRY_NOTICE_S
            if tell:
                told_at = now
            log.log(
                retry_log_level if tell else logging.DEBUG,
                "Kafka at %s unreachable for %.0f s, retrying: %s",
                connection.bootstrap_servers,
                now - began,
                exc,
            )
            await asyncio.sleep(CONNECT_BACKOFF_S)
        except BaseException:
            await producer.stop()
            raise


async def _check_topic(producer: Any, topic: str, servers: str) -> None:
    # A topic created a moment ago may be missing from the first metadata answer: ask again
    # a few times before calling it missing.
    for attempt in range(5):
        updated = await (
            producer.client.add_topic(topic)
            if attempt == 0
            else producer.client.force_metadata_update()
        )
        if not updated:
            raise KafkaConnectionError("no broker answered the metadata request")
        if producer.client.cluster.partitions_for_topic(topic):
            return
        await asyncio.sleep(0.2)
    raise TopicNotFoundError(
        f"topic {topic} does not exist at {servers}; create it with `conntrack-producer topics`"
    )


async def send_event(
    producer: Any, topic: str, value: bytes, connection_id: str, partition: int
) -> Any:
    """Hand one connection event's record to the producer: keyed by its connection id, on its
    connection's partition, with the events topic's headers. Returns the delivery future."""
    with tracing.sending(topic, connection_id) as context:
        return await producer.send(
            topic,
            value=value,
            key=connection_id.encode(),
            partition=partition,
            headers=[*HEADERS, *context],
        )


def partition_count(producer: Any, topic: str) -> int:
    """How many partitions the producer's metadata says `topic` has."""
    return len(producer.client.cluster.partitions_for_topic(topic))
