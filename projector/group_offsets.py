"""Kafka group offsets, committed after the database only so that standard lag tools
(`kafka-consumer-groups --describe`) see progress. They are never read back: the read-model
database holds the positions (projector/partitions.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)


class GroupOffsets:
    """Commits in the background: waiting for the broker's answer (often 5-20 ms) after every
    batch would delay the next batch and so the freshness of the read model. One commit at a
    time; positions that arrive meanwhile are merged and go in the next one."""

    def __init__(self) -> None:
        self.consumer: AIOKafkaConsumer | None = None  # set by whoever creates the consumer
        self._due: dict[TopicPartition, int] = {}
        self._committer: asyncio.Task[None] | None = None

    def commit_soon(self, offsets: dict[TopicPartition, int]) -> None:
        self._due.update(offsets)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit())

    def forget(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self._due.pop(tp, None)

    async def _commit(self) -> None:
        assert self.consumer is not None
        while self._due:
            due, self._due = self._due, {}
            assigned = self.consumer.assignment()
            mine = {tp: offset for tp, offset in due.items() if tp in assigned}
            try:
                if mine:
                    await self.consumer.commit(mine)
            except KafkaError as exc:  # only lag tools read these; the database is the truth
                log.info(
                    "event=group_commit_failed error=%r; the read model is unaffected", str(exc)
                )

    async def flush(self) -> None:
        """Wait (briefly) for the last commit, so lag tools see the final positions after a
        clean stop."""
        if self._committer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._committer, 10)
