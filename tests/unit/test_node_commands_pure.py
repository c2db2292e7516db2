"""The command receiver's pure parts: which partition a node reads, and the transient topics'
settings."""

from __future__ import annotations

from aiokafka.partitioner import murmur2
from hypothesis import given
from hypothesis import strategies as st

from conntrack.producer.commands import partition_for_node
from conntrack.producer.topics import TopicSpec, history_problems, transient_problems

NODE_IDS = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=255
)


@given(NODE_IDS, st.integers(1, 64))
def test_a_node_reads_the_partition_the_default_partitioner_puts_its_key_on(
    node_id: str, partitions: int
) -> None:
    key = node_id.encode()
    # The Java client's formula, which aiokafka's DefaultPartitioner and the API's producer use.
    assert partition_for_node(node_id, partitions) == (murmur2(key) & 0x7FFFFFFF) % partitions


def test_transient_topics_keep_a_day_and_only_compaction_is_a_problem() -> None:
    spec = TopicSpec("conntrack.commands.v1", 6, 3, 2, retention_ms=86_400_000)
    assert not spec.keeps_history
    assert spec.configs() == {
        "cleanup.policy": "delete",
        "retention.ms": "86400000",
        "retention.bytes": "-1",
        "min.insync.replicas": "2",
        "unclean.leader.election.enable": "false",
    }
    assert transient_problems(spec.configs()) == []
    assert history_problems(spec.configs())  # the events' rule would refuse it
    assert transient_problems({"cleanup.policy": "compact,delete"})
    assert TopicSpec("conntrack.events.v1", 6, 3, 2).keeps_history
