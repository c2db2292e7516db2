"""Every Kafka client over SASL_SSL (SCRAM-SHA-512), against the secured broker that
`CONNTRACK_KAFKA_SECURITY=sasl_ssl infra/kafka.sh up` starts (its own CA, broker certificate and
SCRAM users; started once for this module on 127.0.0.1:19094 with its own state, stopped after):
topic provisioning, the publisher (the simulator), the projector, the audit, and the API's
command channel with a gateway node's command receiver (Send). A wrong password and a CA that
did not sign the broker's certificate are one clear line and exit 2, within seconds, not a retry
loop."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import text

from conntrack.api.application.commands import CommandChannel, CommandChannelUnavailable
from conntrack.core.commands import DataType, OutcomeStatus, SendFrame
from conntrack.core.database import create_engine
from conntrack.core.kafka import KafkaConnection, close
from conntrack.core.settings import Settings
from conntrack.core.store import ProjectionStore
from conntrack.migrations.cli import upgrade
from conntrack.producer.commands import NodeCommands
from conntrack.producer.topics import TopicSpec, ensure_topics
from tests.support.kafka import unique

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "infra" / "kafka.sh"
BIN = Path(sys.executable).parent
PORT, CONTROLLER_PORT = 19094, 19095
# A refused start must end well within this (the bulk of it is Python starting a command on a
# busy machine; the broker answers a wrong password at once).
REFUSAL_WITHIN_S = 30.0


@dataclass
class SecuredKafka:
    state: Path
    env: dict[str, str]  # CONNTRACK_KAFKA_* lines of client.env

    @property
    def bootstrap(self) -> str:
        return self.env["CONNTRACK_KAFKA_BOOTSTRAP_SERVERS"]

    def settings(self, **values: object) -> Settings:
        given = {k.removeprefix("CONNTRACK_").lower(): v for k, v in self.env.items()}
        return Settings(**{**given, **values})  # type: ignore[arg-type]

    def connection(self, component: str) -> KafkaConnection:
        return KafkaConnection.from_settings(self.settings(), component)

    def command_env(self, **overrides: str | None) -> dict[str, str]:
        """The environment of a command: no CONNTRACK_* of the caller's, the secured broker's
        client settings, then the overrides (None removes a variable)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")}
        env.update(self.env)
        for name, value in overrides.items():
            key = "CONNTRACK_" + name.upper()
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredKafka]:
    for tool in ("java", "openssl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: the secured broker cannot be started")
    distributions = sorted((REPO / ".local").glob("kafka-dist-*"))
    if not distributions:
        pytest.fail("no Kafka distribution under .local: run infra/kafka.sh up once")
    state_dir = tmp_path_factory.mktemp("kafka-secured")
    for dist in distributions:
        (state_dir / dist.name).symlink_to(dist)
    env = {
        **os.environ,
        "CONNTRACK_KAFKA_SECURITY": "sasl_ssl",
        "CONNTRACK_STATE_DIR": str(state_dir),
        "CONNTRACK_KAFKA_PORT": str(PORT),
        "CONNTRACK_KAFKA_CTRL_PORT": str(CONTROLLER_PORT),
        "CONNTRACK_KAFKA_HEAP": "256m",
    }

    def script(command: str) -> str:
        done = subprocess.run(
            ["bash", str(KAFKA_SH), command], env=env, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, f"infra/kafka.sh {command}: {done.stdout}{done.stderr}"
        return done.stdout

    script("up")
    try:
        client_env = dict(line.split("=", 1) for line in script("env").splitlines() if "=" in line)
        yield SecuredKafka(state_dir / f"kafka-sasl_ssl-{PORT}", client_env)
    finally:
        script("down")


@pytest.fixture
def topics(secured: SecuredKafka) -> dict[str, str]:
    return {
        "events_topic": unique("sec-events"),
        "dead_letter_topic": unique("sec-dlq"),
        "commands_topic": unique("sec-commands"),
        "command_outcomes_topic": unique("sec-outcomes"),
    }


def run(command: list[str], env: dict[str, str], timeout: float = 180) -> tuple[int, str, str]:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


async def end_offsets(connection: KafkaConnection, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(**connection.options())
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        partitions = cluster.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: int(offset) for tp, offset in ends.items()}
    finally:
        await close(consumer)


async def test_topics_publisher_projector_and_audit_over_sasl_ssl(
    secured: SecuredKafka, topics: dict[str, str], tmp_path: Path
) -> None:
    env = secured.command_env(**topics)
    rc, out, err = run([str(BIN / "conntrack-producer"), "topics", "--partitions", "3"], env)
    assert rc == 0, err
    for name in topics.values():
        assert f"{name}: created, 3 partitions" in out

    # The publisher (the simulator publishes through it).
    rc, out, err = run(
        [
            str(BIN / "conntrack-producer"),
            "simulate",
            "--connections",
            "40",
            "--activities",
            "2",
            "--seed",
            "7",
        ],
        env,
    )
    assert rc == 0, err
    connection = secured.connection("test")
    ends = await end_offsets(connection, topics["events_topic"])
    assert sum(ends.values()) > 40

    # The projector folds them into the read model.
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'readmodel.db'}"
    await asyncio.to_thread(upgrade, database_url)
    log_path = tmp_path / "projector.log"
    with log_path.open("wb") as log_file:
        projector = await asyncio.create_subprocess_exec(
            str(BIN / "conntrack-projector"),
            env={
                **env,
                "CONNTRACK_DATABASE_URL": database_url,
                "CONNTRACK_CONSUMER_GROUP": unique("sec-group"),
                "CONNTRACK_BATCH_MAX_WAIT_MS": "20",
            },
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        engine = create_engine(database_url)
        try:
            store = ProjectionStore(engine)
            deadline = time.monotonic() + 120
            while True:
                stored = {
                    p: o
                    for (t, p), o in (await store.all_positions()).items()
                    if t == topics["events_topic"]
                }
                if all(stored.get(p, 0) >= o for p, o in ends.items()):
                    break
                assert projector.returncode is None, log_path.read_text(errors="replace")
                assert time.monotonic() < deadline, f"not caught up: {stored} < {ends}"
                await asyncio.sleep(0.2)
            async with engine.connect() as conn:
                rows = (await conn.execute(text("SELECT count(*) FROM connections"))).scalar()
            assert rows == 40
        finally:
            await engine.dispose()
            if projector.returncode is None:
                projector.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(projector.wait(), 60)
        assert rc == 0, log_path.read_text(errors="replace")

    # The audit reads the log over the same connection and agrees with the read model.
    rc, out, err = run(
        [str(BIN / "conntrack-audit"), "verify", "--database-url", database_url], env
    )
    assert rc == 0, out + err


class Sockets:
    """The gateway's side of a command: the frames it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, DataType]] = []

    async def send(self, connection_id: str, data: bytes, data_type: DataType, /) -> bool:
        self.sent.append((connection_id, data, data_type))
        return True

    async def disconnect(self, connection_id: str, status_code: int, reason: str, /) -> bool:
        return True


async def test_send_through_the_command_channel_over_sasl_ssl(
    secured: SecuredKafka, topics: dict[str, str]
) -> None:
    await ensure_topics(
        secured.connection("topics"),
        [
            TopicSpec(topics["commands_topic"], 1, 1, 1, retention_ms=3_600_000),
            TopicSpec(topics["command_outcomes_topic"], 1, 1, 1, retention_ms=3_600_000),
        ],
    )
    sockets = Sockets()
    node = NodeCommands(
        secured.connection("gateway"),
        "node-sec",
        1,
        sockets,
        commands_topic=topics["commands_topic"],
        outcomes_topic=topics["command_outcomes_topic"],
    )
    channel = CommandChannel(
        secured.connection("api"), topics["commands_topic"], topics["command_outcomes_topic"]
    )
    async with node, channel:
        async with asyncio.timeout(60):
            while not channel.ready:  # noqa: ASYNC110 (a property, no event to wait on)
                await asyncio.sleep(0.1)
        outcome = await channel.execute(
            node_id="node-sec",
            node_incarnation=1,
            connection_id="c-1",
            action=SendFrame(b"hello over TLS", DataType.TEXT),
            timeout_s=30,
        )
    assert outcome.status == OutcomeStatus.DONE
    assert sockets.sent == [("c-1", b"hello over TLS", DataType.TEXT)]


def _refused(
    command: list[str], env: dict[str, str]
) -> tuple[int, str, float]:  # (exit code, stderr, seconds)
    started = time.monotonic()
    rc, _, err = run(command, env, timeout=120)
    return rc, err, time.monotonic() - started


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_a_wrong_password_is_one_line_and_exit_2_not_a_retry_loop(
    secured: SecuredKafka, topics: dict[str, str], tmp_path: Path
) -> None:
    env = secured.command_env(
        **topics, kafka_sasl_password_file=None, kafka_sasl_password="not-the-password"
    )
    rc, err, took = _refused([str(BIN / "conntrack-producer"), "topics"], env)
    line = _one_line(err)
    assert rc == 2, err
    assert "refused the SCRAM-SHA-512 login of 'conntrack'" in line
    assert "CONNTRACK_KAFKA_SASL_PASSWORD" in line
    assert "not-the-password" not in err
    assert took < REFUSAL_WITHIN_S

    # The projector, which waits out an unavailable broker, does not wait this out.
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'readmodel.db'}"
    upgrade(database_url)
    rc, err, took = _refused(
        [str(BIN / "conntrack-projector")], {**env, "CONNTRACK_DATABASE_URL": database_url}
    )
    assert rc == 2, err
    assert "refused the SCRAM-SHA-512 login" in err.splitlines()[-1]
    assert "Traceback" not in err
    assert took < REFUSAL_WITHIN_S


def test_a_ca_that_did_not_sign_the_broker_is_one_line_and_exit_2(
    secured: SecuredKafka, topics: dict[str, str], tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=not the broker's CA",
            "-keyout",
            str(tmp_path / "other-ca.key"),
            "-out",
            str(other_ca),
        ],
        check=True,
        capture_output=True,
    )
    env = secured.command_env(**topics, kafka_ssl_cafile=str(other_ca))
    rc, err, took = _refused([str(BIN / "conntrack-producer"), "topics"], env)
    line = _one_line(err)
    assert rc == 2, err
    assert "the TLS certificate of Kafka at 127.0.0.1:19094 is not trusted" in line
    assert "CONNTRACK_KAFKA_SSL_CAFILE" in line
    assert took < REFUSAL_WITHIN_S

    # The audit's reader, too.
    rc, err, took = _refused(
        [
            str(BIN / "conntrack-audit"),
            "as-of",
            "2026-01-01T00:00:00Z",
            "--database-url",
            f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
        ],
        env,
    )
    assert rc == 2, err
    assert "is not trusted" in _one_line(err)


async def test_the_api_command_channel_stops_retrying_a_refused_login(
    secured: SecuredKafka, topics: dict[str, str]
) -> None:
    refused = KafkaConnection.from_settings(
        secured.settings(kafka_sasl_password_file=None, kafka_sasl_password="wrong"), "api"
    )
    channel = CommandChannel(refused, topics["commands_topic"], topics["command_outcomes_topic"])
    async with channel:
        async with asyncio.timeout(30):
            while channel.failure is None:  # noqa: ASYNC110 (set by the channel's own task)
                await asyncio.sleep(0.1)
        assert "refused the SCRAM-SHA-512 login" in str(channel.failure)
        with pytest.raises(CommandChannelUnavailable, match="refused the SCRAM-SHA-512 login"):
            await channel.execute(
                node_id="n",
                node_incarnation=1,
                connection_id="c",
                action=SendFrame(b"x", DataType.TEXT),
                timeout_s=5,
            )
        assert not channel.ready
