"""The publisher gateway nodes use: one call per connection event, safe and cheap.

Each event gets a fresh UUID event id and the gateway's clock in nanoseconds; the record key is
the connection id, so one connection's events land on one partition in order. The producer is
idempotent with acks from all in-sync replicas, so broker retries never duplicate or reorder.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer

from connection_tracker.events import (
    HEADERS,
    Activity,
    Connected,
    Disconnected,
    Event,
    Payload,
    encode,
)


class Publisher:
    """Async context manager. start() and stop() are idempotent; stop() flushes."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        gateway_id: str,
        *,
        linger_ms: int = 5,
        **producer_options: Any,
    ) -> None:
        self._topic = topic
        self._gateway_id = gateway_id
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            **producer_options,
        )
        self._started = False

    async def start(self) -> None:
        if not self._started:
            await self._producer.start()
            self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._producer.stop()  # flushes what is pending

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def flush(self) -> None:
        await self._producer.flush()

    async def publish(self, event: Event) -> None:
        """Hand one event to the producer; delivery completes in the background (see flush)."""
        if not self._started:
            raise RuntimeError("Publisher is not started")
        await self._producer.send(
            self._topic,
            value=encode(event),
            key=event.connection_id.encode(),
            headers=list(HEADERS),
        )

    def _event(self, connection_id: str, payload: Payload, at_ns: int | None) -> Event:
        return Event(
            event_id=str(uuid.uuid4()),
            connection_id=connection_id,
            gateway_id=self._gateway_id,
            occurred_at_ns=time.time_ns() if at_ns is None else at_ns,
            payload=payload,
        )

    async def connected(
        self, connection_id: str, source_ip: str, user_agent: str, *, at_ns: int | None = None
    ) -> Event:
        event = self._event(connection_id, Connected(source_ip, user_agent), at_ns)
        await self.publish(event)
        return event

    async def activity(
        self, connection_id: str, *, frames: int = 1, at_ns: int | None = None
    ) -> Event:
        event = self._event(connection_id, Activity(frames), at_ns)
        await self.publish(event)
        return event

    async def disconnected(
        self,
        connection_id: str,
        *,
        status_code: int = 1000,
        reason: str = "",
        at_ns: int | None = None,
    ) -> Event:
        event = self._event(connection_id, Disconnected(status_code, reason), at_ns)
        await self.publish(event)
        return event
