"""The API's command channel awaits a command's acknowledgement and its outcome together: how the
acknowledgement's end settles the wait (api/application/commands.py, _delivered)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError

from conntrack.api.application.commands import CommandNotHanded, _delivered
from conntrack.core.commands import Outcome, OutcomeStatus

OUTCOME = Outcome("c1", "node-1", 1, 0, OutcomeStatus.DONE)


def _futures() -> tuple[asyncio.Future[Outcome], asyncio.Future[Any]]:
    loop = asyncio.get_running_loop()
    return loop.create_future(), loop.create_future()


async def test_an_acknowledged_command_leaves_the_wait_to_its_outcome() -> None:
    waiter, delivery = _futures()
    delivery.set_result(object())
    _delivered(waiter, delivery)
    assert not waiter.done()


async def test_a_failed_delivery_fails_the_wait_as_not_handed() -> None:
    waiter, delivery = _futures()
    delivery.set_exception(KafkaTimeoutError("no answer"))
    _delivered(waiter, delivery)
    assert waiter.done()
    with pytest.raises(CommandNotHanded, match="could not be handed to Kafka: KafkaTimeoutError"):
        await waiter


async def test_a_cancelled_delivery_fails_the_wait_as_not_handed() -> None:
    waiter, delivery = _futures()
    delivery.cancel()
    _delivered(waiter, delivery)
    assert waiter.done()
    with pytest.raises(CommandNotHanded, match="stopped before the broker acknowledged"):
        await waiter


async def test_an_outcome_already_in_wins_over_a_late_delivery_error() -> None:
    waiter, delivery = _futures()
    waiter.set_result(OUTCOME)
    delivery.set_exception(KafkaTimeoutError("late"))
    _delivered(waiter, delivery)
    assert await waiter is OUTCOME


async def test_a_caller_that_left_is_not_answered() -> None:
    waiter, delivery = _futures()
    waiter.cancel()
    delivery.set_exception(KafkaTimeoutError("late"))
    _delivered(waiter, delivery)  # no InvalidStateError
    assert waiter.cancelled()
