"""Provisioning of the events, dead-letter, commands, command-outcomes and lifecycle topics,
idempotently.

The events topic is the system of record, so it must keep history: retention.ms=-1 and
retention.bytes=-1 with cleanup.policy=delete (compaction would drop all but the last event of a
connection). The dead-letter topic is evidence of what was rejected, so it keeps history too.
An existing topic is reported with its settings; one whose settings would lose history is refused.

The commands and outcomes topics are not history: a command is worth something until its
caller's deadline, so they are created with a short retention (TopicSpec.retention_ms, 1 day by
default) and only compaction is refused for them (keyed by node, it would drop a node's unread
commands but the last one).

aiokafka's admin client does not raise on a failed CreateTopics or DescribeConfigs: the broker's
per-topic error codes come back in the response, so they are checked here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, for_code

from conntrack.core import kafka
from conntrack.core.kafka import KafkaConnection, connection_of

# The settings that decide whether a topic keeps history and how durably; reported per topic.
_METADATA_ATTEMPTS = 25
REPORTED_CONFIGS = (
    "cleanup.policy",
    "retention.ms",
    "retention.bytes",
    "min.insync.replicas",
    "message.timestamp.type",
    "unclean.leader.election.enable",
)
# Settings that can lose acknowledged records: never set on any of these topics.
DATA_LOSING_CONFIGS = {"unclean.leader.election.enable": "true"}


def default_replication(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for a cluster of this many brokers: three
    replicas where there are three brokers, and then two of them in sync for a write to count,
    so one broker may fail without losing an acknowledged record or stopping writes."""
    replication = min(3, max(1, brokers))
    return replication, 2 if replication >= 3 else 1


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    min_insync_replicas: int
    retention_ms: int | None = None
    """None: the topic keeps history (retention.ms=-1, refused otherwise). A number: a transient
    topic (commands, outcomes) kept this long; only compaction is refused for it."""
    log_append_time: bool = False
    """Stamp records with the broker's append time (the events topic: `as-of` then cuts at what
    the log held, not at what the gateways' clocks said)."""
    extra_configs: tuple[tuple[str, str], ...] = ()
    """Other topic configs passed through (refused if they could lose acknowledged data)."""
    compacted: bool = False
    """A state topic (the lifecycle role's): compacted, each key's last record kept forever;
    any deletion is refused."""

    @property
    def keeps_history(self) -> bool:
        return self.retention_ms is None and not self.compacted

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("topic name is empty")
        if self.partitions < 1:
            raise ValueError(f"{self.name}: partitions must be >= 1")
        if self.replication_factor < 1:
            raise ValueError(f"{self.name}: replication factor must be >= 1")
        if not 1 <= self.min_insync_replicas <= self.replication_factor:
            # acks=all could never be satisfied: every write would fail.
            raise ValueError(
                f"{self.name}: min.insync.replicas must be between 1 and the replication factor"
            )
        if self.compacted and self.retention_ms is not None:
            raise ValueError(f"{self.name}: a compacted topic keeps each key's last record")
        if self.retention_ms is not None and self.retention_ms < 1:
            raise ValueError(f"{self.name}: retention.ms of a transient topic must be >= 1")
        for key, value in self.extra_configs:
            if DATA_LOSING_CONFIGS.get(key) == value.strip().lower():
                raise ValueError(f"{self.name}: {key}={value} can lose acknowledged records")
            if key in _MANAGED_CONFIGS:
                raise ValueError(f"{self.name}: {key} is set by provisioning, not passed through")

    def configs(self) -> dict[str, str]:
        managed = {
            "cleanup.policy": "compact" if self.compacted else "delete",
            "retention.ms": "-1" if self.retention_ms is None else str(self.retention_ms),
            "retention.bytes": "-1",
            "min.insync.replicas": str(self.min_insync_replicas),
            "unclean.leader.election.enable": "false",
        }
        if self.log_append_time:
            managed["message.timestamp.type"] = "LogAppendTime"
        return {**dict(self.extra_configs), **managed}


_MANAGED_CONFIGS = frozenset(
    {
        "cleanup.policy",
        "retention.ms",
        "retention.bytes",
        "min.insync.replicas",
        "unclean.leader.election.enable",
        "message.timestamp.type",
    }
)


@dataclass(frozen=True)
class TopicReport:
    name: str
    created: bool
    partitions: int
    replication_factor: int
    configs: dict[str, str]
    problems: list[str] = field(default_factory=list)
    """Settings that would lose history: the topic is refused."""
    warnings: list[str] = field(default_factory=list)
    """Differences from the spec that do not lose history."""
    keeps_history: bool = True
    """False for a transient topic (commands, outcomes): a finite retention is expected; and
    for a compacted state topic."""
    compacted: bool = False

    def __str__(self) -> str:
        settings = ", ".join(f"{k}={self.configs.get(k, '?')}" for k in REPORTED_CONFIGS)
        state = "created" if self.created else "exists"
        if self.problems:
            verdict = "REFUSED: would lose history" if self.keeps_history else "REFUSED"
        elif self.compacted:
            verdict = "compacted state"
        else:
            verdict = "keeps history" if self.keeps_history else "transient"
        line = (
            f"{self.name}: {state}, {self.partitions} partitions, replication factor "
            f"{self.replication_factor}, {settings}; {verdict}"
        )
        return "\n".join(
            [line]
            + [f"  problem: {p}" for p in self.problems]
            + [f"  warning: {w}" for w in self.warnings]
        )


class TopicProvisioningError(RuntimeError):
    """The broker refused to create or describe a topic; the message has its reason."""


class HistoryLosingTopicError(TopicProvisioningError):
    """An existing topic is configured to delete or compact history."""

    def __init__(self, reports: list[TopicReport]) -> None:
        refused = [r for r in reports if r.problems]
        super().__init__(
            "; ".join(
                f"topic {r.name} "
                + ("would lose history: " if r.keeps_history else "would lose commands: ")
                + ", ".join(r.problems)
                for r in refused
            )
        )
        self.reports = reports


def data_loss_problems(configs: dict[str, str]) -> list[str]:
    return [
        f"{key}={configs[key]} can lose acknowledged records"
        for key, bad in DATA_LOSING_CONFIGS.items()
        if configs.get(key, "").lower() == bad
    ]


def history_problems(configs: dict[str, str]) -> list[str]:
    problems = data_loss_problems(configs)
    if "compact" in configs.get("cleanup.policy", "delete"):
        problems.append(f"cleanup.policy={configs['cleanup.policy']} drops superseded events")
    if configs.get("retention.ms", "-1") != "-1":
        problems.append(f"retention.ms={configs['retention.ms']} deletes old events")
    if configs.get("retention.bytes", "-1") != "-1":
        problems.append(f"retention.bytes={configs['retention.bytes']} deletes old events")
    return problems


def transient_problems(configs: dict[str, str]) -> list[str]:
    """What is wrong with a transient topic (commands, outcomes): only compaction, which keeps
    the last record per key (per node, per API process) and drops the ones before it unread."""
    problems = data_loss_problems(configs)
    if "compact" in configs.get("cleanup.policy", "delete"):
        problems.append(
            f"cleanup.policy={configs['cleanup.policy']} drops all but a key's last record"
        )
    return problems


def state_problems(configs: dict[str, str]) -> list[str]:
    """What is wrong with a compacted state topic: anything that deletes a key's last record."""
    problems = data_loss_problems(configs)
    if configs.get("cleanup.policy", "delete") != "compact":
        problems.append(
            f"cleanup.policy={configs.get('cleanup.policy')} deletes state (use compact alone)"
        )
    return problems


def lifecycle_specs(
    lifecycle_topic: str, state_topic: str, partitions: int, replication: int, min_isr: int
) -> list[TopicSpec]:
    """The lifecycle role's topics (docs/lifecycle.md): the lifecycle stream keeps history like
    the events (two records per connection), its state topic is compacted."""
    return [
        TopicSpec(lifecycle_topic, partitions, replication, min_isr),
        TopicSpec(state_topic, partitions, replication, min_isr, compacted=True),
    ]


def _raise_for(error_code: int, message: str | None, what: str) -> None:
    if error_code:
        error = for_code(error_code)
        raise TopicProvisioningError(f"{what}: {error.__name__}: {message or error.description}")


async def describe_topic_configs(admin: AIOKafkaAdminClient, name: str) -> dict[str, str]:
    for _ in range(_METADATA_ATTEMPTS):
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        resources = [r for response in responses for r in response.resources]
        errors = [(code, message) for code, message, *_ in resources if code]
        if not errors:
            return {entry[0]: entry[1] for *_, entries in resources for entry in entries}
        # A topic created a moment ago may not be known to the answering broker yet.
        if not all(for_code(code).retriable for code, _ in errors):
            break
        await asyncio.sleep(0.2)
    code, message = errors[0]
    _raise_for(code, message, f"cannot describe topic {name}")
    raise AssertionError("unreachable")


async def _describe_layout(admin: AIOKafkaAdminClient, name: str) -> tuple[int, int]:
    """(partitions, replication factor) of an existing topic, once every partition has a
    leader (so that a client may read or write it at once)."""
    for _ in range(_METADATA_ATTEMPTS):
        (topic,) = await admin.describe_topics([name])
        partitions: list[dict[str, Any]] = topic["partitions"]
        # A topic created a moment ago may not be in every broker's metadata yet, nor have
        # elected its leaders.
        led = all(p.get("leader", -1) >= 0 for p in partitions)
        if topic["error_code"] == 0 and partitions and led:
            return len(partitions), min(len(p["replicas"]) for p in partitions)
        if not for_code(topic["error_code"]).retriable and topic["error_code"] != 0:
            break
        await asyncio.sleep(0.2)
    _raise_for(topic["error_code"] or -1, None, f"cannot describe topic {name}")
    raise AssertionError("unreachable")


async def _create(admin: AIOKafkaAdminClient, spec: TopicSpec) -> bool:
    """Create the topic; False if it already exists (perhaps created concurrently)."""
    response = await admin.create_topics(
        [
            NewTopic(
                spec.name, spec.partitions, spec.replication_factor, topic_configs=spec.configs()
            )
        ]
    )
    for entry in response.topic_errors:
        error_code, error_message = entry[1], entry[2] if len(entry) > 2 else None
        if error_code == TopicAlreadyExistsError.errno:
            return False
        _raise_for(error_code, error_message, f"cannot create topic {spec.name}")
    return True


def _warnings(
    spec: TopicSpec, partitions: int, replication: int, configs: dict[str, str]
) -> list[str]:
    out = []
    if partitions != spec.partitions:
        out.append(
            f"has {partitions} partitions, {spec.partitions} requested (not changed: adding "
            "partitions moves keys, and so connections, to other partitions)"
        )
    if replication < spec.replication_factor:
        out.append(f"replication factor {replication} < {spec.replication_factor} requested")
    retention = configs.get("retention.ms")
    if spec.retention_ms is not None and retention != str(spec.retention_ms):
        out.append(f"retention.ms={retention}, {spec.retention_ms} requested")
    min_isr = configs.get("min.insync.replicas", "1")
    if min_isr.isdigit() and int(min_isr) < spec.min_insync_replicas:
        out.append(f"min.insync.replicas={min_isr} < {spec.min_insync_replicas} requested")
    if spec.log_append_time and configs.get("message.timestamp.type") != "LogAppendTime":
        out.append(
            f"message.timestamp.type={configs.get('message.timestamp.type')}: records carry the "
            "gateways' clocks, so `conntrack-audit as-of` cuts by them, not by what the log held "
            "(a topic's timestamp type can be changed with kafka-configs)"
        )
    return out


async def _admin(servers: str | KafkaConnection) -> AIOKafkaAdminClient:
    connection = connection_of(servers, "topics")
    admin = AIOKafkaAdminClient(**connection.options())
    try:
        await kafka.start(admin, connection)
    except BaseException:
        await kafka.close(admin)  # a failed start leaves its connections open otherwise
        raise
    return admin


async def broker_count(servers: str | KafkaConnection) -> int:
    """How many brokers the cluster has (for the default replication)."""
    admin = await _admin(servers)
    try:
        cluster = await admin.describe_cluster()
        return len(cluster["brokers"])
    finally:
        await admin.close()


async def ensure_topics(
    servers: str | KafkaConnection, specs: list[TopicSpec]
) -> list[TopicReport]:
    """Create missing topics; report existing ones with their settings. Raises
    HistoryLosingTopicError (after checking every topic) if any would lose history (or, for a
    transient topic, is compacted), and
    TopicProvisioningError if the broker refuses a request."""
    admin = await _admin(servers)
    reports = []
    try:
        for spec in specs:
            created = await _create(admin, spec)
            configs = await describe_topic_configs(admin, spec.name)
            partitions, replication = await _describe_layout(admin, spec.name)
            reports.append(
                TopicReport(
                    name=spec.name,
                    created=created,
                    partitions=partitions,
                    replication_factor=replication,
                    configs={k: configs[k] for k in REPORTED_CONFIGS if k in configs},
                    problems=(
                        state_problems(configs)
                        if spec.compacted
                        else history_problems(configs)
                        if spec.keeps_history
                        else transient_problems(configs)
                    ),
                    warnings=[] if created else _warnings(spec, partitions, replication, configs),
                    keeps_history=spec.keeps_history,
                    compacted=spec.compacted,
                )
            )
    finally:
        await admin.close()
    if any(r.problems for r in reports):
        raise HistoryLosingTopicError(reports)
    return reports
