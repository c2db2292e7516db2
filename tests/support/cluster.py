"""A private multi-broker KRaft cluster for tests (infra/kafka.sh cluster), on ports and in a
state directory of its own: the shared broker and a developer's own cluster are left alone."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "infra" / "kafka.sh"


def _free(ports: Iterable[int]) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _port_bases(size: int) -> tuple[int, int]:
    """Two bases whose next `size` ports are all free, below the ephemeral range (32768+), so
    a client's outgoing connection cannot take one between this check and the node's bind."""
    rnd = random.Random()
    for _ in range(200):
        client, controller = rnd.randrange(21000, 26000), rnd.randrange(26000, 32000)
        if _free(range(client + 1, client + size + 1)) and _free(
            range(controller + 1, controller + size + 1)
        ):
            return client, controller
    raise AssertionError("no free loopback ports for the cluster")


@dataclass
class Cluster:
    size: int
    client_base: int
    env: dict[str, str]

    @classmethod
    def create(cls, state_dir: Path, size: int = 3) -> Cluster:
        distributions = sorted((REPO / ".local").glob("kafka-dist-*"))
        if not distributions:
            raise AssertionError("no Kafka distribution under .local: run infra/kafka.sh up once")
        for dist in distributions:
            (state_dir / dist.name).symlink_to(dist)
        client, controller = _port_bases(size)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")}
        env.update(
            CONNTRACK_STATE_DIR=str(state_dir),
            CONNTRACK_CLUSTER_PORT=str(client),
            CONNTRACK_CLUSTER_CTRL_PORT=str(controller),
            CONNTRACK_CLUSTER_HEAP="384m",
            # C1 only: a node (re)starts in half the time on a busy 2-core machine (24 -> 10 s
            # measured with `cluster kill 1; cluster start 1`), and 200 events/s need no C2.
            CONNTRACK_CLUSTER_JAVA_OPTS="-XX:TieredStopAtLevel=1",
            # For measuring what broker settings change (docs/operations.md, "What a broker
            # failure costs"); unset in the suite.
            CONNTRACK_CLUSTER_BROKER_PROPS=os.environ.get(
                "CONNTRACK_TEST_CLUSTER_BROKER_PROPS", ""
            ),
        )
        return cls(size, client, env)

    @property
    def bootstrap(self) -> str:
        return ",".join(self.address(i) for i in range(1, self.size + 1))

    def address(self, node: int) -> str:
        return f"127.0.0.1:{self.client_base + node}"

    def run(self, *args: str, timeout: float = 240) -> str:
        done = subprocess.run(
            [str(KAFKA_SH), "cluster", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"infra/kafka.sh cluster {' '.join(args)}: " + (
            done.stdout + done.stderr
        )
        return done.stdout

    async def arun(self, *args: str) -> str:
        return await asyncio.to_thread(self.run, *args)

    async def up(self) -> None:
        """Start the nodes not running (all of them the first time) and wait until they serve."""
        await self.arun("up", str(self.size))

    async def kill(self, node: int) -> None:
        await self.arun("kill", str(node))

    async def start(self, node: int) -> None:
        await self.arun("start", str(node))

    async def controller(self) -> int:
        """The active KRaft controller (the metadata quorum's leader), as kafka-metadata-quorum
        reports it; the admin client's describe_cluster names a random broker in KRaft mode."""
        return int((await self.arun("controller")).strip())

    async def describe(self, topics: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
        """Partitions (leader, replicas, isr) of each topic (None: every topic, the internal
        ones too), from a live node."""
        for attempt in range(20):
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            try:
                await admin.start()
                return {t["topic"]: t["partitions"] for t in await admin.describe_topics(topics)}
            except KafkaError:
                # While a node is down the admin client may still pick it (NodeNotReadyError).
                if attempt == 19:
                    raise
            finally:
                await admin.close()
            await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    async def leader(self, topic: str, partition: int) -> int:
        partitions = (await self.describe([topic]))[topic]
        (found,) = [p for p in partitions if p["partition"] == partition]
        return int(found["leader"])

    async def coordinator(self, group: str) -> int:
        """The node coordinating this consumer group."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            return int(await admin.find_coordinator(group))
        finally:
            await admin.close()

    async def wait_fully_replicated(self, within: float = 120) -> None:
        """Until every partition of every topic (__consumer_offsets too) has all its replicas in
        sync (a node restarted a moment ago is still catching up): only then can any one node
        die without stopping acks=all writes."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            try:
                described = await self.describe()
                lagging = {
                    (topic, p["partition"]): (p["replicas"], p["isr"])
                    for topic, partitions in described.items()
                    for p in partitions
                    if not partitions or set(p["isr"]) != set(p["replicas"])
                }
                if all(described.values()) and not lagging:
                    return
            except Exception as exc:  # a node may still be starting; ask again
                lagging = {("?", -1): ([], [repr(exc)])}
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"replicas still out of sync after {within} s: {lagging}")
            await asyncio.sleep(0.5)
