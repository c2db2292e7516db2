"""docker-compose.yml stays a valid Compose file that wires the services together, as Compose
itself reads it (tests/support/compose.py; no engine needed). Besides the wiring, the file must
say whether each service does its job (healthchecks that check the work, not an open port) and pin
its images (tests/test_image.py covers the Dockerfile). tests/integration/test_compose_stack.py
runs the topology.
"""

from __future__ import annotations

import re

import pytest

from tests.support.compose import (
    ComposeConfig,
    load_compose_config,
    parse_yaml,
    parse_yaml_key_paths,
)
from tests.support.repo import REPO


def test_yaml_key_path_parser() -> None:
    text = (
        "services:\n"
        "  api:\n"
        "    command:\n"
        "    - conntrack-api\n"
        "    environment:\n"
        "      A_URL: postgresql+asyncpg://u:p@h:5432/db\n"
        "      B: '9465'\n"
        "    healthcheck:\n"
        "      test:\n"
        "      - import x; f('http://127.0.0.1:9465/metrics',\n"
        "        timeout=3)\n"
        "  kafka:\n"
        "    image: apache/kafka:4.1.1\n"
        "version: '3.9'\n"
    )
    paths = parse_yaml_key_paths(text)
    assert paths[("services", "api", "environment", "A_URL")] == (
        "postgresql+asyncpg://u:p@h:5432/db"
    )
    assert paths[("services", "api", "environment", "B")] == "9465"
    assert paths[("services", "api", "healthcheck", "test")] is None
    assert paths[("services", "kafka", "image")] == "apache/kafka:4.1.1"
    assert paths[("version",)] == "3.9"
    assert ("services", "api", "environment", "kafka") not in paths

    _, sequences = parse_yaml(text)
    assert sequences[("services", "api", "command")] == ("conntrack-api",)
    assert sequences[("services", "api", "healthcheck", "test")] == (
        "import x; f('http://127.0.0.1:9465/metrics', timeout=3)",
    )


@pytest.fixture(scope="module")
def compose_config() -> ComposeConfig:
    return load_compose_config()


def test_all_services_are_defined(compose_config: ComposeConfig) -> None:
    expected = {
        "kafka",
        "postgres",
        "topics",
        "migrate",
        "projector",
        "api",
        "gateway",
        "lifecycle",
    }
    missing = expected - compose_config.services
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


def test_app_services_get_their_connection_settings(compose_config: ComposeConfig) -> None:
    projector_env = compose_config.keys_under("services", "projector", "environment")
    api_env = compose_config.keys_under("services", "api", "environment")
    assert {"CONNTRACK_DATABASE_URL", "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS"} <= projector_env
    assert {"CONNTRACK_DATABASE_URL", "CONNTRACK_API_LISTEN"} <= api_env
    # Send, Disconnect and Broadcast need the command channel; REST is on.
    assert {"CONNTRACK_KAFKA_BOOTSTRAP_SERVERS", "CONNTRACK_API_REST_PORT"} <= api_env

    for service in ("projector", "api", "migrate"):
        url = compose_config.value("services", service, "environment", "CONNTRACK_DATABASE_URL")
        assert url is not None
        assert url.startswith("postgresql+asyncpg://"), url
        assert "@postgres:5432/" in url, url
    for service in ("projector", "topics", "api", "gateway", "lifecycle"):
        servers = compose_config.value(
            "services", service, "environment", "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS"
        )
        assert servers == "kafka:9092"
    # Inside a container a loopback listener would be unreachable through the published port.
    for service, setting in (
        ("api", "CONNTRACK_API_LISTEN"),
        ("gateway", "CONNTRACK_GATEWAY_LISTEN"),
    ):
        listen = compose_config.value("services", service, "environment", setting)
        assert listen is not None
        assert listen.startswith("0.0.0.0:")


def test_start_up_order(compose_config: ComposeConfig) -> None:
    def condition(service: str, dependency: str) -> str | None:
        return compose_config.value("services", service, "depends_on", dependency, "condition")

    assert condition("topics", "kafka") == "service_healthy"
    assert condition("migrate", "postgres") == "service_healthy"
    assert condition("projector", "migrate") == "service_completed_successfully"
    assert condition("projector", "topics") == "service_completed_successfully"
    assert condition("api", "migrate") == "service_completed_successfully"
    assert condition("api", "topics") == "service_completed_successfully"
    assert condition("gateway", "topics") == "service_completed_successfully"
    assert condition("lifecycle", "topics") == "service_completed_successfully"
    # service_healthy is only meaningful with a healthcheck to wait for.
    for service in ("kafka", "postgres"):
        assert compose_config.keys_under("services", service, "healthcheck") >= {"test"}


# An exact version (at least major.minor, e.g. postgres:16.15-trixie, apache/kafka:4.1.1) or a
# digest; never a moving tag such as `16`, `latest` or none at all.
_PINNED_IMAGE = re.compile(r"^[\w./-]+(?::\d+\.\d+[\w.-]*)?(?:@sha256:[0-9a-f]{64})?$")


def image_is_pinned(image: str) -> bool:
    if _PINNED_IMAGE.fullmatch(image) is None:
        return False
    return "@sha256:" in image or re.search(r":\d+\.\d+", image) is not None


def test_image_pin_rule() -> None:
    assert image_is_pinned("apache/kafka:4.1.1")
    assert image_is_pinned("postgres:16.15-trixie")
    assert image_is_pinned("postgres@sha256:" + "a" * 64)
    assert image_is_pinned("postgres:16.15@sha256:" + "a" * 64)
    for moving in ("postgres", "postgres:16", "postgres:latest", "apache/kafka:4-rc"):
        assert not image_is_pinned(moving), moving


def test_third_party_images_are_pinned(compose_config: ComposeConfig) -> None:
    for service in sorted(compose_config.services):
        if compose_config.keys_under("services", service, "build"):
            continue  # the project's own image, built from the Dockerfile (tests/test_image.py)
        image = compose_config.value("services", service, "image")
        assert image is not None
        assert image_is_pinned(image), f"{service}: image {image!r} is not pinned"


def test_long_running_services_have_healthchecks(compose_config: ComposeConfig) -> None:
    for service in ("kafka", "postgres", "projector", "api", "lifecycle"):
        assert compose_config.items("services", service, "healthcheck", "test"), service
        assert compose_config.value("services", service, "restart") == "unless-stopped"
    # One-shot jobs must not be restarted, or `service_completed_successfully` never comes.
    for job in ("topics", "migrate"):
        assert compose_config.value("services", job, "restart") == "no"


def test_projector_healthcheck_checks_consumption(compose_config: ComposeConfig) -> None:
    # Not just "the metrics page answers": the script (tests/test_projector_healthcheck.py)
    # wants owned partitions and committed batches whenever there is lag.
    test = compose_config.items("services", "projector", "healthcheck", "test")
    assert test == ("CMD", "python", "/opt/conntrack/projector_healthcheck.py")
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY docker/projector_healthcheck.py /opt/conntrack/projector_healthcheck.py" in (
        dockerfile
    )
    # The script reads the port from the container's environment, which the check inherits.
    port = compose_config.value("services", "projector", "environment", "CONNTRACK_METRICS_PORT")
    assert port is not None
    assert port.isdigit()
    assert int(port) > 0


def test_api_healthcheck_asks_the_grpc_health_service(compose_config: ComposeConfig) -> None:
    test = " ".join(compose_config.items("services", "api", "healthcheck", "test"))
    assert test.startswith("CMD python -c ")
    assert "HealthStub" in test
    assert "SERVING" in test


def test_the_projector_scales_without_a_port_collision(compose_config: ComposeConfig) -> None:
    """`docker compose up --scale projector=3`: a fixed host port would let only one replica
    start; the metrics port is published on an ephemeral host port per replica."""
    ports = compose_config.items("services", "projector", "ports")
    assert ports, "the projector's metrics port is published"
    for port in ports:
        host_ip, host_port, _container = (
            str(port).rsplit(":", 2)
            if port.count(":") >= 2
            else (
                "",
                "",
                port,
            )
        )
        assert host_port == "", f"projector publishes a fixed host port: {port}"
        assert host_ip == "127.0.0.1", f"projector metrics reachable beyond loopback: {port}"
