"""A publisher's spool mode (spool_dir=...; producer/spool_files.py is the disk format;
docs/producer.md, "Durable spool").

Instead of reporting an event it could not deliver, the publisher writes it to the spool, and
from the first failure on every new event goes there too, behind the others, until a replayer
task has delivered the whole spool, in order; then events go straight to the broker again. The
events in flight at the switch go to the spool first, in the order they were handed in, so an
event of a connection handed in later can never get ahead of one that fails later. Only an event
the full spool refuses is reported (SpoolFullError). What the spool holds survives a crash of
the process and is replayed by the next start with the same directory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

from aiokafka.errors import KafkaError

from conntrack.core.events import InvalidEvent, decode_tuple
from conntrack.producer import kafka_producer
from conntrack.producer.errors import SpoolFullError
from conntrack.producer.ledger import Future, Ledger, Record
from conntrack.producer.outcomes import Outcomes
from conntrack.producer.replacement import ProducerSlot
from conntrack.producer.spool import Spool

log = logging.getLogger(__name__)

# Records per replay round (each round waits for its acknowledgements), and the pause after a
# round failed (the broker is still away) or while no producer can take them.
_REPLAY_BATCH: Final = 1000
_REPLAY_RETRY_S: Final = 0.5


class Spooling:
    def __init__(
        self,
        spool: Spool,
        *,
        ledger: Ledger,
        outcomes: Outcomes,
        topic: str,
        partition_of: Callable[[str], int],
        delivery_timeout_s: float,
    ) -> None:
        self.spool = spool
        self._ledger = ledger
        self._outcomes = outcomes
        self._topic = topic
        self._partition_of = partition_of
        self._delivery_timeout_s = delivery_timeout_s
        self._slot: ProducerSlot | None = None
        # While set, every new event goes to the spool (behind what it holds): from the first
        # failure until the replayer has delivered the whole spool.
        self.active = False
        # In-flight events also written to the spool: their failure is not reported, and one
        # acknowledged after all is not replayed (a lost entry here only means a duplicate).
        self._spooled_ids: set[str] = set()
        # In-flight events the full spool could not take at the switch: if they fail, they are
        # reported (a later copy would land behind newer events of their connection).
        self._unspooled_ids: set[str] = set()
        self._skip_replay: set[str] = set()
        self._replayer: asyncio.Task[None] | None = None
        self._replay_futures: list[Future] = []
        self._refusing = False
        # The oldest in-flight event and when it was first seen oldest (_watch_in_flight).
        self._oldest: tuple[Future, float] | None = None
        self.spooled = 0
        self.replayed = 0
        self.refused = 0

    @property
    def is_open(self) -> bool:
        return self.spool.is_open

    async def open(self) -> None:
        await self.spool.open()

    def start(self, slot: ProducerSlot) -> None:
        """What a previous run left is delivered before anything new."""
        self._slot = slot
        self.active = self.spool.pending > 0
        if self.active:
            log.info(
                "the spool at %s holds %d event(s) from before; replaying them first",
                self.spool.directory,
                self.spool.pending,
            )
        self._replayer = asyncio.create_task(self._replay())

    def replay_in_flight(self) -> list[Future]:
        return [f for f in self._replay_futures if not f.done()]

    # -- taking events --------------------------------------------------------------------------

    def degrade(self) -> None:
        """From now on new events go to the spool; the events in flight go there first."""
        if self.active or not self.spool.is_open:
            return
        self.active = True
        for future, record in self._ledger.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                continue  # acknowledged; its callback has not run yet
            self.keep(record)

    def keep(self, record: Record) -> None:
        """Spool an in-flight event in its place; a failure of it is then not reported."""
        if self._put(record):
            self._spooled_ids.add(record.event.event_id)
        else:
            self._unspooled_ids.add(record.event.event_id)

    def take_new(self, record: Record) -> None:
        """Put a new event in the spool, or report it and raise SpoolFullError."""
        if self._put(record):
            return
        error = SpoolFullError(
            f"the broker is not taking events and the spool at {self.spool.directory} is full "
            f"({self.spool.size_bytes} of {self.spool.max_bytes} bytes): event "
            f"{record.event.event_id} was refused"
        )
        self._outcomes.undeliverable(record.event, error)
        raise error

    def absorb(self, record: Record) -> bool:
        """An event was not delivered: True if the spool has it (now or since the switch),
        False if it must be reported."""
        if not self.spool.is_open:
            return False
        self.degrade()
        event_id = record.event.event_id
        if event_id in self._spooled_ids:
            self._spooled_ids.discard(event_id)
            return True
        if event_id in self._unspooled_ids:
            self._unspooled_ids.discard(event_id)
            return False
        return self._put(record)

    def acknowledged(self, event_id: str) -> None:
        """An in-flight event was delivered after all: its copy in the spool is not replayed."""
        if self._spooled_ids and event_id in self._spooled_ids:
            self._spooled_ids.discard(event_id)
            self._skip_replay.add(event_id)
        self._unspooled_ids.discard(event_id)

    def _put(self, record: Record) -> bool:
        if self.spool.put(record.value):
            self.spooled += 1
            self._refusing = False
            return True
        self.refused += 1
        if not self._refusing:  # one warning per run of refusals; all are counted
            self._refusing = True
            log.warning(
                "the spool at %s is full (%d bytes): event %s and any more are refused until "
                "the broker takes the spooled ones (counted in spool_refused)",
                self.spool.directory,
                self.spool.max_bytes,
                record.event.event_id,
            )
        return False

    # -- replaying ------------------------------------------------------------------------------

    async def _replay(self) -> None:
        """Background task: deliver the spool, in order, whenever a producer can take it; once it
        is empty, let new events go straight to the broker again."""
        failing = False
        while True:
            try:
                failing = await self._round(failing)
            except Exception:
                # Never let the spool stop draining: say why, and try again.
                log.exception("replaying the spool failed unexpectedly; retrying")
                with contextlib.suppress(Exception):
                    await self.spool.rewind()
                failing = True
                await asyncio.sleep(_REPLAY_RETRY_S)

    async def _round(self, failing: bool) -> bool:
        """One step of _replay; returns whether replaying is failing now."""
        slot, spool = self._slot, self.spool
        assert slot is not None
        self._watch_in_flight(slot)
        if spool.pending == 0:
            if (
                self.active
                and not slot.replacing
                and slot.producer is not None
                and not self._ledger.handing
            ):
                # No await from the checks to the switch, and no event is being handed to the
                # producer (one that was would belong in the spool, behind what it held).
                self.active = False
                self._skip_replay.clear()
                log.info("the spool is delivered; events go to the broker again")
            await asyncio.sleep(_REPLAY_RETRY_S / 5)
            return failing
        producer = slot.producer
        if producer is None or slot.replacing:
            await asyncio.sleep(_REPLAY_RETRY_S)
            return failing
        if spool.unread == 0:
            await spool.durable()
        batch = await spool.read(_REPLAY_BATCH)
        if not batch:
            await asyncio.sleep(_REPLAY_RETRY_S / 5)
            return failing
        delivered, skipped = await self._send(producer, batch)
        if delivered is not None:
            await spool.ack(batch[-1][0])
            self.replayed += delivered
            self._skip_replay.difference_update(skipped)
            if failing:
                log.info("the spool is being delivered again")
            return False
        await spool.rewind()
        if not failing:
            log.warning(
                "replaying the spool failed; %d event(s) wait in it, retrying", spool.pending
            )
        slot.replace_soon_if_current(producer)  # its failed batch broke its sequence numbers
        await asyncio.sleep(_REPLAY_RETRY_S)
        return True

    def _watch_in_flight(self, slot: ProducerSlot) -> None:
        """An event unacknowledged for delivery_timeout_s counts as failed.

        aiokafka fails a batch only when its partition has had no leader that long. A broker
        that stops while the producer is idle leaves it believing the old leader (its metadata
        requests fail, so nothing updates it), and it retries the batch forever: no failure would
        ever send the events to the spool. The oldest in-flight event is the first in the
        ledger; one that stays the oldest for delivery_timeout_s was sent at least that long
        ago."""
        oldest = self._ledger.oldest()
        if self.active or slot.replacing or oldest is None:
            self._oldest = None
            return
        now = asyncio.get_running_loop().time()
        if self._oldest is None or self._oldest[0] is not oldest:
            self._oldest = (oldest, now)
        elif now - self._oldest[1] >= self._delivery_timeout_s:
            self._oldest = None
            log.warning(
                "%d event(s) unacknowledged for %g s: the broker is away; they and the events "
                "after them go to the spool at %s",
                len(self._ledger),
                self._delivery_timeout_s,
                self.spool.directory,
            )
            slot.replace_soon()

    async def _send(
        self, producer: Any, batch: list[tuple[int, bytes]]
    ) -> tuple[int | None, list[str]]:
        """Send one round of spooled records and wait for all of them: (how many the broker
        acknowledged, the ids skipped), or (None, ...) if any failed."""
        skipped: list[str] = []
        futures: list[Future] = []
        self._replay_futures = futures
        try:
            for _, value in batch:
                try:
                    event_id, connection_id, *_ = decode_tuple(value)
                except InvalidEvent as exc:  # cannot happen for what the publisher wrote
                    log.error("a spooled record is not an event, skipped: %s", exc)
                    continue
                if event_id in self._skip_replay:
                    skipped.append(event_id)
                    continue
                futures.append(
                    await kafka_producer.send_event(
                        producer,
                        self._topic,
                        value,
                        connection_id,
                        self._partition_of(connection_id),
                    )
                )
            if futures:
                done, waiting = await asyncio.wait(futures, timeout=self._delivery_timeout_s)
                if waiting or any(f.cancelled() or f.exception() is not None for f in done):
                    return None, skipped
        except KafkaError as exc:
            log.debug("replaying the spool: %r", exc)
            return None, skipped
        finally:
            self._replay_futures = []
        return len(futures), skipped

    # -- stopping -------------------------------------------------------------------------------

    async def wait(self, deadline: float) -> int:
        """Wait until the spool is delivered or the deadline passes; how many events remain."""
        spool = self.spool
        if not spool.is_open:
            return 0
        loop = asyncio.get_running_loop()
        await spool.durable()
        # A poll: the count falls with acks made in a worker thread; 20 ms is cheap and short.
        while spool.pending and loop.time() < deadline and self._replayer is not None:  # noqa: ASYNC110
            await asyncio.sleep(min(0.02, max(0.0, deadline - loop.time())))
        return spool.pending

    async def stop_replayer(self) -> None:
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
            self._replayer = None

    async def close(self) -> None:
        spool = self.spool
        if not spool.is_open:
            return
        await spool.close()
        self.active = False
        self._spooled_ids.clear()
        self._unspooled_ids.clear()
        self._skip_replay.clear()
        if spool.pending:
            log.warning(
                "%d event(s) stay in the spool at %s; the next start replays them",
                spool.pending,
                spool.directory,
            )
