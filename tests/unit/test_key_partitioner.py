"""KeyPartitioner (core/kafka.py): the default partitioner's answers, remembered."""

from __future__ import annotations

from aiokafka.partitioner import murmur2
from hypothesis import given
from hypothesis import strategies as st

from conntrack.core.kafka import KeyPartitioner


@given(st.lists(st.tuples(st.binary(max_size=64), st.integers(1, 64)), max_size=50))
def test_it_answers_as_the_java_clients_formula_for_every_key_and_partition_count(
    calls: list[tuple[bytes, int]],
) -> None:
    partitioner = KeyPartitioner(max_keys=8)  # small: the cache is also emptied on the way
    for key, partitions in calls * 2:  # each asked twice: the second answer comes remembered
        every = list(range(partitions))
        expected = (murmur2(key) & 0x7FFFFFFF) % partitions
        assert partitioner(key, every, every) == expected
        assert partitioner(key, every, [every[-1]]) == expected  # availability plays no part


def test_a_topic_with_more_partitions_maps_a_key_afresh_and_the_cache_stays_bounded() -> None:
    partitioner = KeyPartitioner(max_keys=4)
    key = b"api-0123456789abcdef"
    answers = {n: partitioner(key, list(range(n)), list(range(n))) for n in range(1, 40)}
    assert answers == {n: (murmur2(key) & 0x7FFFFFFF) % n for n in range(1, 40)}
    assert len(partitioner._known) <= 4


def test_records_without_a_key_go_to_an_available_partition() -> None:
    partitioner = KeyPartitioner()
    assert {partitioner(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
    assert {partitioner(None, [0, 1, 2], []) for _ in range(200)} <= {0, 1, 2}
    assert not partitioner._known
