"""Provisioning of the events topic and the dead-letter topic, idempotently.

The events topic is the system of record, so it must keep history: retention.ms=-1 and
retention.bytes=-1 with cleanup.policy=delete (compaction would drop all but the last event of a
connection). An existing topic whose settings would lose history is reported and refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    min_insync_replicas: int

    def configs(self) -> dict[str, str]:
        return {
            "cleanup.policy": "delete",
            "retention.ms": "-1",
            "retention.bytes": "-1",
            "min.insync.replicas": str(self.min_insync_replicas),
        }


class HistoryLosingTopicError(RuntimeError):
    """An existing topic is configured to delete or compact history."""


def history_problems(configs: dict[str, str]) -> list[str]:
    problems = []
    if "compact" in configs.get("cleanup.policy", "delete"):
        problems.append(f"cleanup.policy={configs['cleanup.policy']} drops superseded events")
    if configs.get("retention.ms", "-1") != "-1":
        problems.append(f"retention.ms={configs['retention.ms']} deletes old events")
    if configs.get("retention.bytes", "-1") != "-1":
        problems.append(f"retention.bytes={configs['retention.bytes']} deletes old events")
    return problems


async def describe_topic_configs(admin: AIOKafkaAdminClient, name: str) -> dict[str, str]:
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    out: dict[str, str] = {}
    for response in responses:
        for resource in response.resources:
            for entry in resource[4]:
                out[entry[0]] = entry[1]
    return out


async def ensure_topics(bootstrap_servers: str, specs: list[TopicSpec]) -> list[str]:
    """Create missing topics; verify existing ones keep history. Returns what it did, per topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    report = []
    try:
        existing = set(await admin.list_topics())
        for spec in specs:
            if spec.name not in existing:
                try:
                    await admin.create_topics(
                        [
                            NewTopic(
                                spec.name,
                                spec.partitions,
                                spec.replication_factor,
                                topic_configs=spec.configs(),
                            )
                        ]
                    )
                    report.append(f"created {spec.name} ({spec.partitions} partitions)")
                    continue
                except TopicAlreadyExistsError:
                    pass  # created concurrently: check it like any existing topic
            problems = history_problems(await describe_topic_configs(admin, spec.name))
            if problems:
                raise HistoryLosingTopicError(
                    f"topic {spec.name} exists but would lose history: " + "; ".join(problems)
                )
            report.append(f"{spec.name} exists and keeps history")
    finally:
        await admin.close()
    return report
