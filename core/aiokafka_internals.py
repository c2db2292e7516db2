"""Every place the project reaches into aiokafka's internals, and nowhere else: each works around
something aiokafka 0.14 does not offer (or gets wrong) through its public API.
tests/unit/test_aiokafka_internals.py fails when the pinned aiokafka no longer has what these
rely on, so an upgrade cannot break them silently."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.commit import OffsetFetchRequest
from aiokafka.structs import TopicPartition

log = logging.getLogger(__name__)

# Between two metadata requests of one producer: retry.backoff.ms after an answer, and after a
# failure an exponential backoff like the Java client's reconnect.backoff.ms/.max.ms.
_METADATA_BACKOFF_S: Final = 0.1
_RECONNECT_BACKOFF_S: Final = 0.05
_RECONNECT_BACKOFF_MAX_S: Final = 1.0


def back_off_metadata_requests(client: Any) -> None:
    """Make one aiokafka client wait between metadata requests.

    aiokafka 0.14 has no reconnect backoff at all (no reconnect_backoff_ms option), and its
    sender asks for metadata again as soon as the previous request ends whenever a partition
    has no known leader (producer/sender.py, `if unknown_leaders_exist`). With the broker away
    each request is one refused connection, so the loop reconnects thousands of times a second
    and keeps a core busy for the whole outage. Every metadata request goes through
    `_metadata_update` (the background synchroniser and fetch_all_metadata), so spacing its
    calls bounds that loop without changing anything else."""
    update: Callable[[Any, Any], Awaitable[bool]] = client._metadata_update
    loop = asyncio.get_running_loop()
    next_at = 0.0
    backoff_s = _RECONNECT_BACKOFF_S

    async def spaced_update(cluster_metadata: Any, topics: Any) -> bool:
        nonlocal next_at, backoff_s
        wait_s = next_at - loop.time()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        updated = bool(await update(cluster_metadata, topics))
        if updated:
            backoff_s = _RECONNECT_BACKOFF_S
            next_at = loop.time() + _METADATA_BACKOFF_S
        else:
            # Jitter, as in the Java client: many gateways losing one broker do not all come
            # back in step.
            next_at = loop.time() + backoff_s * random.uniform(0.8, 1.2)
            backoff_s = min(2 * backoff_s, _RECONNECT_BACKOFF_MAX_S)
        return updated

    client._metadata_update = spaced_update


async def fail_held(producer: Any, error: BaseException) -> None:
    """Stop the producer's sender and fail every record it still holds with `error`.

    aiokafka retries a batch forever while its partition has a leader (it only expires batches
    of leaderless partitions), so its stop() would not return while the broker is away."""
    sender = getattr(producer, "_sender", None)
    accumulator = getattr(producer, "_message_accumulator", None)
    if sender is None or accumulator is None:
        return
    await sender.close()
    # A batch waiting to be retried was taken out of _pending_batches by reenqueue(), yet the
    # done-callback of its first drain removes it from there again once fail_all fails it: a
    # KeyError logged per batch. Put such batches back first.
    pending = getattr(accumulator, "_pending_batches", None)
    if isinstance(pending, set):
        for batches in getattr(accumulator, "_batches", {}).values():
            pending.update(b for b in batches if b.retry_count > 0)
    accumulator.fail_all(error)
    # fail_all also fails the drain waiter of each batch nobody was appending to; left unread,
    # each would be logged as "Future exception was never retrieved".
    for batches in getattr(accumulator, "_batches", {}).values():
        for batch in batches:
            waiter = getattr(batch, "_drain_waiter", None)
            if waiter is not None and waiter.done() and not waiter.cancelled():
                waiter.exception()


# OffsetFetch errors after which the request is simply repeated: the group's coordinator is still
# loading its offsets (right after a broker start), or it is not available or another broker now
# (then it is looked up again first).
_COORDINATOR_LOADING: Final = 14
_COORDINATOR_GONE: Final = frozenset({15, 16})


class AskAgain(Exception):
    """An OffsetFetch answer that is no answer yet: repeat the request (after looking the
    coordinator up again, if `rediscover`)."""

    def __init__(self, rediscover: bool) -> None:
        super().__init__("the group coordinator is not ready")
        self.rediscover = rediscover


def offset_in(response: Any, tp: TopicPartition) -> int | None:
    """What an OffsetFetch answer says of tp: its committed offset, or None (nothing committed).
    Raises AskAgain for an answer that is no answer yet, and the answer's other errors."""
    codes = [getattr(response, "error_code", 0)]  # the group's, from version 2 on
    offset = None
    for topic, partitions in response.topics:
        for partition, committed, _, error in partitions:
            if (topic, partition) == (tp.topic, tp.partition):
                codes.append(error)
                offset = int(committed) if committed >= 0 else None
    for code in codes:
        if code == _COORDINATOR_LOADING or code in _COORDINATOR_GONE:
            raise AskAgain(rediscover=code in _COORDINATOR_GONE)
        if code:
            raise for_code(code)()
    return offset


async def committed_offset(
    consumer: Any, tp: TopicPartition, *, retry_backoff_s: float = 0.1
) -> int | None:
    """The consumer group's committed offset of tp, or None if nothing is committed: what
    consumer.committed(tp) answers, except while the group's coordinator is loading its offsets.
    aiokafka 0.14 reads only the per-partition errors of an OffsetFetch answer, and from version
    2 on a broker that has just started answers COORDINATOR_LOAD_IN_PROGRESS for the whole group,
    with no partitions at all: consumer.committed() took that for "nothing committed", and a
    gateway node started then skipped the commands waiting for it. Here such an answer is asked
    again until it is a real one (bound the call with a timeout)."""
    coordinator = consumer._coordinator
    while True:
        await coordinator.ensure_coordinator_known()
        request = OffsetFetchRequest(coordinator.group_id, [(tp.topic, [tp.partition])])
        try:
            return offset_in(await coordinator._send_req(request), tp)
        except AskAgain as again:
            log.debug("event=offset_fetch_again group=%s partition=%s", coordinator.group_id, tp)
            if again.rediscover:
                coordinator.coordinator_dead()
        except KafkaError as exc:  # _send_req has marked the coordinator dead
            if not exc.retriable:
                raise
        await asyncio.sleep(retry_backoff_s)


async def topic_partitions(consumer: Any, topic: str) -> set[int] | None:
    """The partitions of `topic` from a fresh full metadata fetch (the consumer's own cache
    covers only its assigned topics); None for a topic the cluster does not have."""
    cluster = await consumer._client.fetch_all_metadata()
    parts: set[int] | None = cluster.partitions_for_topic(topic)
    return parts
