"""What core/aiokafka_internals.py relies on in aiokafka's internals, checked on the pinned
aiokafka without a broker: a change of aiokafka that breaks a reliance fails here, not in an
outage."""

from __future__ import annotations

import asyncio
import inspect

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.producer.message_accumulator import MessageBatch
from aiokafka.structs import TopicPartition

from conntrack.core.aiokafka_internals import back_off_metadata_requests, fail_held


async def test_metadata_requests_go_through_one_replaceable_method() -> None:
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9")
    client = producer.client
    original = client._metadata_update
    assert inspect.iscoroutinefunction(original)
    assert list(inspect.signature(original).parameters) == ["cluster_metadata", "topics"]
    # Every metadata request calls it: the background synchroniser and the full fetch.
    source = inspect.getsource(type(client))
    assert "await self._metadata_update(" in source
    calls: list[object] = []

    async def answered(cluster_metadata: object, topics: object) -> bool:
        calls.append(topics)
        return True

    client._metadata_update = answered
    back_off_metadata_requests(client)
    assert client._metadata_update is not answered
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client._metadata_update(None, ["a"])
    await client._metadata_update(None, ["b"])  # spaced after an answer
    assert calls == [["a"], ["b"]]
    assert loop.time() - started >= 0.09
    await producer.stop()


async def test_what_a_producer_holds_can_be_failed_without_a_broker() -> None:
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9")
    accumulator = producer._message_accumulator
    tp = TopicPartition("t", 0)
    waiting = MessageBatch(tp, accumulator.create_builder(), ttl=30, linger_time=0)
    retried = MessageBatch(tp, accumulator.create_builder(), ttl=30, linger_time=0)
    retried._retry_count = 1  # as after a drain and reenqueue()
    accumulator._batches[tp].extend([waiting, retried])
    assert isinstance(accumulator._pending_batches, set)
    error = RuntimeError("not acknowledged")
    await fail_held(producer, error)
    for batch in (waiting, retried):
        assert batch.future.done()
        assert batch.future.exception() is error
        assert batch.retry_count in (0, 1)
        assert batch._drain_waiter.done()
    assert retried in accumulator._pending_batches
    await producer.stop()


async def test_fail_held_leaves_an_object_without_those_internals_alone() -> None:
    class Plain:
        stopped = False

    plain = Plain()
    await fail_held(plain, RuntimeError("x"))
    assert vars(plain) == {}


async def test_a_consumers_group_coordinator_and_full_metadata_fetch_are_reachable() -> None:
    """committed_offset sends OffsetFetch through the consumer's group coordinator (aiokafka's
    committed() misreads a loading coordinator's answer); topic_partitions asks the client for a
    full metadata fetch (the consumer's cache holds only its assigned topics)."""
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", group_id="g")
    assert consumer._client is not None
    assert inspect.iscoroutinefunction(consumer._client.fetch_all_metadata)
    # The coordinator exists once the consumer starts; its class has what committed_offset uses.
    from aiokafka.consumer.group_coordinator import GroupCoordinator

    for name in ("ensure_coordinator_known", "_send_req"):
        assert inspect.iscoroutinefunction(getattr(GroupCoordinator, name)), name
    assert callable(GroupCoordinator.coordinator_dead)
    assert "self.group_id" in inspect.getsource(GroupCoordinator.__init__)
    source = inspect.getsource(AIOKafkaConsumer.start)
    assert "self._coordinator = GroupCoordinator(" in source
    await consumer.stop()
