"""Reading a group's committed offset from OffsetFetch answers (conntrack.core.kafka), with
aiokafka's own response classes: a coordinator still loading after a broker start must not read
as "nothing committed" (aiokafka 0.14's consumer.committed() took it so)."""

from __future__ import annotations

import pytest
from aiokafka.errors import GroupAuthorizationFailedError, UnknownTopicOrPartitionError
from aiokafka.protocol.commit import OffsetFetchResponse_v1, OffsetFetchResponse_v3
from aiokafka.structs import TopicPartition

from conntrack.core.aiokafka_internals import AskAgain, offset_in

TP = TopicPartition("commands", 2)


def test_the_committed_offset() -> None:
    answer = OffsetFetchResponse_v3(0, [("commands", [(2, 41, "", 0)])], 0)
    assert offset_in(answer, TP) == 41


def test_nothing_committed() -> None:
    assert offset_in(OffsetFetchResponse_v3(0, [("commands", [(2, -1, "", 0)])], 0), TP) is None
    assert offset_in(OffsetFetchResponse_v1([("commands", [(2, -1, "", 0)])]), TP) is None


def test_other_partitions_are_not_read() -> None:
    answer = OffsetFetchResponse_v3(
        0, [("commands", [(1, 7, "", 0)]), ("other", [(2, 9, "", 0)])], 0
    )
    assert offset_in(answer, TP) is None


def test_a_loading_coordinator_is_asked_again_not_read_as_nothing_committed() -> None:
    # What Kafka 4.1 answered the first time after it restarted: the group's error, no topics.
    with pytest.raises(AskAgain) as again:
        offset_in(OffsetFetchResponse_v3(0, [], 14), TP)
    assert not again.value.rediscover
    with pytest.raises(AskAgain):  # the same error per partition (older brokers)
        offset_in(OffsetFetchResponse_v1([("commands", [(2, -1, "", 14)])]), TP)


@pytest.mark.parametrize("code", [15, 16])
def test_a_coordinator_gone_or_moved_is_looked_up_again(code: int) -> None:
    with pytest.raises(AskAgain) as again:
        offset_in(OffsetFetchResponse_v3(0, [], code), TP)
    assert again.value.rediscover


def test_other_errors_are_raised() -> None:
    with pytest.raises(GroupAuthorizationFailedError):
        offset_in(OffsetFetchResponse_v3(0, [], 30), TP)
    with pytest.raises(UnknownTopicOrPartitionError):
        offset_in(OffsetFetchResponse_v3(0, [("commands", [(2, -1, "", 3)])], 0), TP)
