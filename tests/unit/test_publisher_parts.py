"""The Publisher's parts that need no broker, each on its own: the in-flight ledger, the
outcomes, the one event check, and the spool mode's taking of events (the parts that talk to
Kafka are tested on their own against the real broker in
tests/integration/test_publisher_parts.py)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from conntrack.core.events import (
    MIN_TIME_NS,
    Activity,
    Connected,
    Disconnected,
    Event,
    InvalidEvent,
    NodeHeartbeat,
    decode,
    encode,
)
from conntrack.producer.errors import SpoolFullError, UndeliveredEventsError
from conntrack.producer.ledger import Ledger, Record, pass_on
from conntrack.producer.outcomes import Outcomes
from conntrack.producer.spool import Spool
from conntrack.producer.spool_files import record_bytes, stored_payloads
from conntrack.producer.spooling import Spooling
from conntrack.producer.validation import checked_value


def _record(i: int) -> Record:
    event = Event(f"e{i}", f"c{i}", "gw", MIN_TIME_NS + i, Activity(1))
    return Record(event, encode(event))


async def test_the_ledger_keeps_order_room_and_encodings() -> None:
    ledger = Ledger(max_pending=2)
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(2)]
    for i, future in enumerate(futures):
        await ledger.take_room(loop.time() + 1)
        ledger.track(future, _record(i))
    assert len(ledger) == 2
    assert ledger.oldest() is futures[0]
    assert [r.event.event_id for _, r in ledger.items()] == ["e0", "e1"]
    with pytest.raises(TimeoutError):  # max_pending unacknowledged: the next one waits
        await ledger.take_room(loop.time() + 0.05)
    futures[0].set_result(None)
    record = ledger.pop(futures[0])
    assert record is not None
    assert decode(record.value) == record.event  # the bytes sent are the event's
    assert ledger.pop(futures[0]) is None  # settled once
    await ledger.take_room(loop.time() + 0.05)  # its room came back
    ledger.give_room()
    remaining = await ledger.wait(loop.time() + 0.05)
    assert remaining == 1


async def test_parked_events_are_in_flight_but_not_carried() -> None:
    ledger = Ledger(max_pending=10)
    loop = asyncio.get_running_loop()
    carried = loop.create_future()
    ledger.track(carried, _record(0))
    parked = ledger.park(_record(1))
    assert parked in ledger
    assert ledger.carried() == [carried]
    unparked = ledger.unpark()
    assert unparked is not None
    assert unparked[1] is parked
    assert ledger.unpark() is None
    sent = loop.create_future()
    sent.set_exception(RuntimeError("refused"))
    pass_on(parked, sent)
    assert isinstance(parked.exception(), RuntimeError)
    pass_on(parked, sent)  # already settled: left alone


async def test_handing_over_is_waited_for() -> None:
    ledger = Ledger(max_pending=1)
    loop = asyncio.get_running_loop()
    with ledger.handing_over():
        assert ledger.handing
        started = loop.time()
        await ledger.handed(loop.time() + 0.05)  # gives up at the deadline
        assert loop.time() - started >= 0.04
    assert not ledger.handing
    await ledger.handed(loop.time() + 5)  # returns at once


def test_outcomes_report_each_event_once_and_raise_once(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    def callback(event: Event, error: BaseException) -> None:
        seen.append(event.event_id)
        raise ValueError("a gateway's bug")  # logged, never breaks the publisher

    outcomes = Outcomes(callback)
    outcomes.raise_if_failures()  # nothing failed
    with caplog.at_level(logging.WARNING):
        outcomes.undeliverable(_record(1).event, RuntimeError("first"))
        outcomes.undeliverable(_record(2).event, RuntimeError("second"))
    assert seen == ["e1", "e2"]
    assert outcomes.undelivered == 2
    assert sum("not delivered" in r.message for r in caplog.records) == 1
    with pytest.raises(UndeliveredEventsError) as raised:
        outcomes.raise_if_failures()
    assert "first" in str(raised.value)
    outcomes.raise_if_failures()  # reported once


def test_the_event_check_names_the_field() -> None:
    ok = Event("e", "c", "gw", MIN_TIME_NS, Connected("10.0.0.1", "ua"))
    assert decode(checked_value(ok)) == ok
    bad = [
        (Event("e", "", "gw", MIN_TIME_NS, Activity(1)), "connection_id is required"),
        (Event("e", "c", "gw", 0, Activity(1)), "outside 2000-01-01"),
        (Event("e", "c", "gw", MIN_TIME_NS, Activity(-1)), "frames -1"),
        (Event("e", "c", "gw", MIN_TIME_NS, Disconnected(70000, "")), "status_code 70000"),
        (Event("e", "c", "gw", MIN_TIME_NS, NodeHeartbeat("n", 1)), "must not carry"),
        (Event("e", "", "gw", MIN_TIME_NS, NodeHeartbeat("n", 0)), "incarnation 0"),
        (Event("e", "c", "gw", MIN_TIME_NS, Connected("a\x00", "ua")), "NUL"),
    ]
    for event, message in bad:
        with pytest.raises(InvalidEvent, match=message):
            checked_value(event)


async def test_spool_mode_keeps_in_flight_events_in_order_and_refuses_when_full(
    tmp_path: Path,
) -> None:
    """Spooling on its own, on a real spool directory (its replay needs a broker: see
    tests/integration/test_publisher_spool.py)."""
    ledger, outcomes = Ledger(max_pending=10), Outcomes(None)
    first, second, third = _record(1), _record(2), _record(3)
    spooling = Spooling(
        Spool(tmp_path / "spool", record_bytes(first.value) * 3),
        ledger=ledger,
        outcomes=outcomes,
        topic="t",
        partition_of=lambda connection_id: 0,
        delivery_timeout_s=1.0,
    )
    await spooling.open()
    try:
        in_flight = asyncio.get_running_loop().create_future()
        ledger.track(in_flight, first)
        assert not spooling.active
        spooling.degrade()  # the first failure: what is in flight goes to the spool first
        assert spooling.active
        assert spooling.spooled == 1
        assert spooling.absorb(first)  # its failure is not reported: the spool has it
        spooling.take_new(second)
        assert spooling.spooled == 2
        spooling.take_new(third)
        with pytest.raises(SpoolFullError):
            spooling.take_new(_record(4))
        assert (spooling.refused, outcomes.undelivered) == (1, 1)
        await spooling.spool.durable()
        assert spooling.spool.pending == 3
    finally:
        await spooling.close()
    assert [decode(v).event_id for v in stored_payloads(tmp_path / "spool")] == ["e1", "e2", "e3"]
