"""Topic provisioning on the real broker: idempotent, reporting, refusing history-losing topics."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from conntrack.producer.topics import (
    HistoryLosingTopicError,
    TopicProvisioningError,
    TopicSpec,
    default_replication,
    describe_topic_configs,
    ensure_topics,
)
from tests.support.kafka import create_raw, delete_topics, unique

pytestmark = [pytest.mark.kafka]


@pytest.fixture
async def names(kafka_bootstrap: str) -> AsyncIterator[list[str]]:
    """Fresh topic names; whatever exists under them afterwards is deleted."""
    created = [unique("prov"), unique("prov-dlq")]
    yield created
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics()) & set(created)
    finally:
        await admin.close()
    if existing:
        await delete_topics(kafka_bootstrap, sorted(existing))


async def test_creates_history_keeping_topics_then_reports_them_unchanged(
    kafka_bootstrap: str, names: list[str]
) -> None:
    specs = [TopicSpec(name, 4, 1, 1) for name in names]
    first = await ensure_topics(kafka_bootstrap, specs)
    assert [(r.name, r.created, r.partitions, r.replication_factor) for r in first] == [
        (name, True, 4, 1) for name in names
    ]
    for report in first:
        assert report.configs == {
            "cleanup.policy": "delete",
            "retention.ms": "-1",
            "retention.bytes": "-1",
            "min.insync.replicas": "1",
            "message.timestamp.type": "CreateTime",  # only the events topic asks for LogAppendTime
            "unclean.leader.election.enable": "false",
        }
        assert report.problems == []
        assert "keeps history" in str(report)

    second = await ensure_topics(kafka_bootstrap, specs)
    assert [r.created for r in second] == [False, False]
    assert [(r.partitions, r.configs, r.warnings) for r in second] == [
        (r.partitions, r.configs, []) for r in first
    ]
    assert all(str(r).startswith(f"{r.name}: exists, 4 partitions") for r in second)


async def test_an_existing_topic_with_other_partitions_is_kept_and_the_difference_reported(
    kafka_bootstrap: str, names: list[str]
) -> None:
    await ensure_topics(kafka_bootstrap, [TopicSpec(names[0], 2, 1, 1)])
    (report,) = await ensure_topics(kafka_bootstrap, [TopicSpec(names[0], 6, 1, 1)])
    assert report.partitions == 2
    assert report.problems == []
    assert report.warnings
    assert "2 partitions, 6 requested" in report.warnings[0]


@pytest.mark.parametrize(
    ("configs", "problem"),
    [
        ({"retention.ms": "1000"}, "retention.ms=1000 deletes old events"),
        ({"cleanup.policy": "compact"}, "cleanup.policy=compact drops superseded events"),
        ({"retention.ms": "-1", "retention.bytes": "1048576"}, "retention.bytes=1048576"),
        ({}, "deletes old events"),  # the broker's default retention (a week, unless changed)
    ],
)
async def test_refuses_an_existing_topic_that_would_lose_history(
    kafka_bootstrap: str, names: list[str], configs: dict[str, str], problem: str
) -> None:
    bad, good = names
    await create_raw(kafka_bootstrap, bad, configs)
    specs = [TopicSpec(bad, 2, 1, 1), TopicSpec(good, 2, 1, 1)]
    with pytest.raises(HistoryLosingTopicError, match=f"topic {bad} would lose history") as err:
        await ensure_topics(kafka_bootstrap, specs)
    assert problem in str(err.value)
    # Every topic was checked and reported, the good one provisioned; the bad one left alone.
    reports = {r.name: r for r in err.value.reports}
    assert "REFUSED" in str(reports[bad])
    assert reports[good].created
    assert reports[good].problems == []
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        after = await describe_topic_configs(admin, bad)
    finally:
        await admin.close()
    for key, value in configs.items():
        assert after[key] == value


async def test_a_request_the_broker_refuses_is_an_error_not_a_success(
    kafka_bootstrap: str, names: list[str]
) -> None:
    # One broker cannot hold three replicas; aiokafka returns this as an error code, not raises.
    with pytest.raises(TopicProvisioningError, match="InvalidReplicationFactor"):
        await ensure_topics(kafka_bootstrap, [TopicSpec(names[0], 1, 3, 2)])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", 1, 1, 1), "name"),
        (("t", 0, 1, 1), "partitions"),
        (("t", 1, 0, 1), "replication"),
        (("t", 1, 1, 2), "min.insync.replicas"),
        (("t", 1, 3, 0), "min.insync.replicas"),
    ],
)
def test_impossible_specs_are_refused(args: tuple[str, int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TopicSpec(*args)


def test_a_transient_topic_needs_a_positive_retention() -> None:
    with pytest.raises(ValueError, match=r"retention\.ms"):
        TopicSpec("t", 1, 1, 1, retention_ms=0)


async def test_transient_topics_are_created_short_lived_and_only_compaction_is_refused(
    kafka_bootstrap: str, names: list[str]
) -> None:
    commands, compacted = names
    day = 86_400_000
    (report,) = await ensure_topics(kafka_bootstrap, [TopicSpec(commands, 2, 1, 1, day)])
    assert report.created
    assert report.configs["retention.ms"] == str(day)
    assert (report.problems, report.keeps_history) == ([], False)
    assert str(report).endswith("; transient")

    # Any retention is fine for commands (a week here), reported as a difference; the rule
    # that refuses history-losing settings is for the events and dead-letter topics only.
    (again,) = await ensure_topics(kafka_bootstrap, [TopicSpec(commands, 2, 1, 1, 3_600_000)])
    assert not again.created
    assert again.problems == []
    assert again.warnings == [f"retention.ms={day}, 3600000 requested"]

    # Compaction keeps one command per node: the others would be lost unread.
    await create_raw(kafka_bootstrap, compacted, {"cleanup.policy": "compact"})
    with pytest.raises(HistoryLosingTopicError, match=f"topic {compacted} would lose commands"):
        await ensure_topics(kafka_bootstrap, [TopicSpec(compacted, 2, 1, 1, day)])


@pytest.mark.parametrize(
    ("brokers", "expected"), [(1, (1, 1)), (2, (2, 1)), (3, (3, 2)), (5, (3, 2))]
)
def test_default_replication_fits_the_cluster(brokers: int, expected: tuple[int, int]) -> None:
    assert default_replication(brokers) == expected


async def test_the_events_topic_is_stamped_by_the_log_and_takes_other_configs(
    kafka_bootstrap: str, names: list[str]
) -> None:
    spec = TopicSpec(
        names[0], 2, 1, 1, log_append_time=True, extra_configs=(("max.message.bytes", "2000000"),)
    )
    (report,) = await ensure_topics(kafka_bootstrap, [spec])
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        configs = await describe_topic_configs(admin, names[0])
    finally:
        await admin.close()
    assert configs["message.timestamp.type"] == "LogAppendTime"
    assert configs["unclean.leader.election.enable"] == "false"
    assert configs["max.message.bytes"] == "2000000"
    assert report.configs["message.timestamp.type"] == "LogAppendTime"
    assert report.problems == []


def test_settings_that_can_lose_acknowledged_records_are_refused() -> None:
    with pytest.raises(ValueError, match="can lose acknowledged records"):
        TopicSpec("t", 1, 1, 1, extra_configs=(("unclean.leader.election.enable", "TRUE"),))
    with pytest.raises(ValueError, match="set by provisioning"):
        TopicSpec("t", 1, 1, 1, extra_configs=(("retention.ms", "1000"),))


async def test_an_existing_topic_that_can_lose_records_or_follows_create_time_is_reported(
    kafka_bootstrap: str, names: list[str]
) -> None:
    unclean, create_time = names
    await create_raw(kafka_bootstrap, unclean, {"unclean.leader.election.enable": "true"})
    with pytest.raises(HistoryLosingTopicError, match="can lose acknowledged records"):
        await ensure_topics(kafka_bootstrap, [TopicSpec(unclean, 2, 1, 1)])
    await create_raw(
        kafka_bootstrap,
        create_time,
        {"message.timestamp.type": "CreateTime", "retention.ms": "-1", "retention.bytes": "-1"},
    )
    (report,) = await ensure_topics(
        kafka_bootstrap, [TopicSpec(create_time, 3, 1, 1, log_append_time=True)]
    )
    assert report.problems == []
    assert any("gateways' clocks" in w for w in report.warnings)
