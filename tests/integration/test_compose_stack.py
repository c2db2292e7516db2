"""The compose topology, run without a container engine (there is none here).

Every app service of docker-compose.yml runs as a process with the command and environment that
Compose itself resolves (`docker-compose --profile demo config`), in the order its `depends_on`
says: the jobs (`restart: "no"`) to exit 0 first, then the long-running services. The services'
host names are mapped to the loopback: `kafka:9092` to a broker of this module's own (so the
file's fixed topic names meet no other test's), `postgres:5432` to the test PostgreSQL with a
fresh database in place of the file's, and every port a service listens on to a free loopback
port. Then the README's calls go through it (conntrack-api get / send / disconnect, the REST
mapping), the Grafana dashboard and the alert rules name only metrics that a scrape of it exposes,
and every service stops cleanly on SIGTERM, as `docker compose stop` sends it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url
from websockets.asyncio.client import connect

from tests.conftest import PrivateBroker, _create_pg_database, _drop_pg_database
from tests.support.compose import ComposeConfig, load_compose_config
from tests.support.ports import free_port
from tests.support.promql import alert_expressions, dashboard_expressions, metric_names

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

BIN = Path(sys.executable).parent
READY_S = 90.0


class Loopback:
    """Compose's network on one host: service host names to loopback addresses, container ports
    to free loopback ports (the same container port of two services would be two ports here,
    but the file gives each service its own)."""

    def __init__(self, kafka: str, database_url: str) -> None:
        self.kafka = kafka
        self.database = make_url(database_url)
        self.ports: dict[int, int] = {}

    def port(self, container_port: int) -> int:
        return self.ports.setdefault(container_port, free_port())

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        mapped: dict[str, str] = {}
        for key, value in env.items():
            if key == "CONNTRACK_DATABASE_URL":
                url = make_url(value)
                assert (url.host, url.port) == ("postgres", 5432), value
                value = url.set(
                    host=self.database.host,
                    port=self.database.port,
                    database=self.database.database,
                ).render_as_string(hide_password=False)
            else:
                value = value.replace("kafka:9092", self.kafka)
                listen = re.fullmatch(r"(0\.0\.0\.0:)?(\d+)", value)
                if listen and key.endswith(("_LISTEN", "_PORT")):
                    port = self.port(int(listen[2]))
                    value = f"127.0.0.1:{port}" if listen[1] else str(port)
            for host in ("kafka:", "postgres:"):
                assert host not in value, f"{key}={value}: a host name this test does not map"
            mapped[key] = value
        return mapped


@dataclass
class Stack:
    config: ComposeConfig
    loopback: Loopback
    logs: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    env: dict[str, dict[str, str]] = field(default_factory=dict)

    def log_tail(self, service: str, lines: int = 30) -> str:
        path = self.logs / f"{service}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {service} ---\n" + "\n".join(text.splitlines()[-lines:])

    def all_logs(self) -> str:
        return "\n".join(self.log_tail(s) for s in sorted(self.env))

    def port_of(self, service: str, setting: str) -> int:
        value = self.env[service][setting]
        return int(value.rpartition(":")[2])

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`conntrack-api` as the README runs it on the host, against the API's published
        port."""
        target = f"127.0.0.1:{self.port_of('api', 'CONNTRACK_API_LISTEN')}"
        return subprocess.run(
            [str(BIN / "conntrack-api"), *args, "--target", target],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_base_environment(),
            check=False,
        )

    def rest(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        port = self.port_of("api", "CONNTRACK_API_REST_PORT")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")


def _base_environment() -> dict[str, str]:
    """The test's environment without its own CONNTRACK_* variables: a container starts with
    only what the file gives it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")}


def _start_order(config: ComposeConfig, services: list[str]) -> list[str]:
    """The app services in an order that starts each after what it depends on."""
    order: list[str] = []

    def visit(service: str) -> None:
        if service in order or service not in services:
            return
        for dependency in sorted(config.keys_under("services", service, "depends_on")):
            visit(dependency)
        order.append(service)

    for service in sorted(services):
        visit(service)
    return order


def _wait_for_port(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def stack(
    private_broker: PrivateBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    config = load_compose_config("--profile", "demo")
    database_url = asyncio.run(_create_pg_database())
    logs = tmp_path_factory.mktemp("compose-logs")
    stack = Stack(config, Loopback(private_broker.bootstrap, database_url), logs)
    # Infrastructure (kafka, postgres) is mapped above; the app services are built from the
    # project's image (`build:`) and run its console scripts.
    apps = [s for s in config.services if ("services", s, "build") in config.paths]
    try:
        for service in _start_order(config, apps):
            env = {
                key: config.value("services", service, "environment", key) or ""
                for key in config.keys_under("services", service, "environment")
            }
            stack.env[service] = stack.loopback.environment(env)
            command = list(config.items("services", service, "command"))
            with (logs / f"{service}.log").open("wb") as log:
                process = subprocess.Popen(
                    [str(BIN / command[0]), *command[1:]],
                    env={**_base_environment(), **stack.env[service]},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=logs,
                )
            if config.value("services", service, "restart") == "no":
                code = process.wait(timeout=180)
                assert code == 0, f"job {service} exited {code}\n{stack.log_tail(service)}"
            else:
                stack.running[service] = process
        deadline = time.monotonic() + READY_S
        for service, env in stack.env.items():
            for setting in ("CONNTRACK_METRICS_PORT", "CONNTRACK_GATEWAY_LISTEN"):
                if setting in env and service in stack.running:
                    assert _wait_for_port(stack.port_of(service, setting), deadline), (
                        f"{service} does not listen on {setting}\n{stack.all_logs()}"
                    )
        yield stack
    finally:
        for process in stack.running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        asyncio.run(_drop_pg_database(database_url))


def _until(check: Callable[[], bool], what: str, stack: Stack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s\n{stack.all_logs()}"
        time.sleep(0.3)


def test_every_service_runs(stack: Stack) -> None:
    expected = {"topics", "migrate", "projector", "api", "lifecycle", "gateway", "simulator"}
    assert expected <= set(stack.env)
    assert {"projector", "api", "lifecycle", "gateway"} == set(stack.running)
    for service, process in stack.running.items():
        assert process.poll() is None, f"{service} exited\n{stack.log_tail(service)}"


async def test_the_readme_calls_go_through_it(stack: Stack) -> None:
    url = f"ws://127.0.0.1:{stack.port_of('gateway', 'CONNTRACK_GATEWAY_LISTEN')}/"
    async with connect(url, user_agent_header="compose-test/1.0") as ws:
        assert ws.response is not None
        cid = ws.response.headers["X-Connection-Id"]

        await asyncio.to_thread(
            _until, lambda: stack.cli("get", cid).returncode == 0, f"Get finds {cid}", stack
        )
        got = json.loads(stack.cli("get", cid).stdout)
        assert got["id"] == cid
        assert got["identity"]["userAgent"] == "compose-test/1.0"

        status, body = await asyncio.to_thread(
            stack.rest, "GET", f"/apigateways/websocket/v1/connections/{cid}"
        )
        assert (status, body["id"]) == (200, cid)  # type: ignore[index]

        sent = await asyncio.to_thread(stack.cli, "send", cid, "--text", "hello over compose")
        assert sent.returncode == 0, sent.stderr
        assert await asyncio.wait_for(ws.recv(), 10) == "hello over compose"
        status, body = await asyncio.to_thread(
            stack.rest,
            "POST",
            f"/apigateways/websocket/v1/connections/{cid}:send",
            {"data": "aGk=", "type": "BINARY"},
        )
        assert (status, body) == (200, {})
        assert await asyncio.wait_for(ws.recv(), 10) == b"hi"

        gone = await asyncio.to_thread(stack.cli, "disconnect", cid)
        assert gone.returncode == 0, gone.stderr
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1000

    await asyncio.to_thread(
        _until, lambda: stack.cli("get", cid).returncode == 1, "Get answers NOT_FOUND", stack
    )
    status, body = await asyncio.to_thread(
        stack.rest, "GET", f"/apigateways/websocket/v1/connections/{cid}"
    )
    assert status == 404
    assert body["code"] == 5  # type: ignore[index]


# The sample names each family type exposes, as Prometheus stores them.
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
}


def _scrape(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_the_dashboard_and_the_alerts_name_only_metrics_a_scrape_exposes(stack: Stack) -> None:
    exposed: set[str] = set()
    for service, env in stack.env.items():
        if service in stack.running and "CONNTRACK_METRICS_PORT" in env:
            exposed |= _scrape(stack.port_of(service, "CONNTRACK_METRICS_PORT"))
    dashboard = set().union(*map(metric_names, dashboard_expressions()))
    # The webhook (conntrack-lifecycle webhook) needs a receiver of the user's, so compose has
    # no such service; tests/test_alert_rules.py checks its names against its registry.
    alerts = {
        name
        for name in set().union(*map(metric_names, alert_expressions()))
        if not name.startswith("conntrack_webhook_")
    }
    assert len(dashboard) > 20
    assert len(alerts) > 10
    assert dashboard <= exposed, sorted(dashboard - exposed)
    assert alerts <= exposed, sorted(alerts - exposed)


def test_the_simulated_traffic_reached_the_read_model(stack: Stack) -> None:
    port = stack.port_of("projector", "CONNTRACK_METRICS_PORT")

    def applied() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            text = page.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "conntrack_projector_events_applied"
            for sample in family.samples
            if sample.name.endswith("_total")
        )

    # The simulator's 100 connections, each with its connect and activities.
    _until(lambda: applied() >= 100, "the projector applies the simulated events", stack)


def test_every_service_stops_cleanly_on_sigterm(stack: Stack) -> None:
    for service in reversed(list(stack.running)):
        process = stack.running[service]
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{service} still runs 30 s after SIGTERM\n{stack.log_tail(service)}")
        assert code == 0, f"{service} exited {code}\n{stack.log_tail(service)}"
        log = (stack.logs / f"{service}.log").read_text(errors="replace")
        assert "Traceback" not in log, stack.log_tail(service, 80)
