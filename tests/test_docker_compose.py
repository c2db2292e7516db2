"""docker-compose.yml stays a valid Compose file that wires the services together.

`docker-compose config` (Compose v1.29, Debian's `docker-compose` package) or `docker compose
config` (v2) parses, validates and normalises the file without needing a Docker engine. v2 can
print JSON; v1.29 prints only YAML, which is read here with a small parser of its normalised block
layout, so the tests need no YAML library.

Besides the wiring, the file must say whether each service does its job (healthchecks that check
the work, not an open port) and pin its images (tests/test_image.py covers the Dockerfile).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
TIMEOUT_S = 120
INSTALL_HINT = "Debian: apt-get install --no-install-recommends docker-compose"

# A path of mapping keys from the document root, e.g. ("services", "api", "environment", "X").
KeyPath = tuple[str, ...]

# `key:` or `key: value` at some indentation, in the block style that `config` prints.
_YAML_KEY = re.compile(
    r"^(?P<indent> *)(?P<key>[^\s\-#'\"][^:]*?|'[^']*'|\"[^\"]*\"):(?: (?P<value>.*))?$"
)


# `- item` of a block sequence, and what follows the dash.
_YAML_ITEM = re.compile(r"^(?P<indent> *)- (?P<value>.*)$")


@dataclass(frozen=True)
class ComposeConfig:
    """What `config` printed: the service names, every mapping key path with its scalar, and
    the scalar items of every sequence (e.g. a healthcheck's `test`)."""

    services: frozenset[str]
    paths: Mapping[KeyPath, str | None]
    sequences: Mapping[KeyPath, tuple[str, ...]]

    def items(self, *path: str) -> tuple[str, ...]:
        assert path in self.sequences, f"{'.'.join(path)} is not a sequence in the compose file"
        return self.sequences[path]

    def keys_under(self, *prefix: str) -> set[str]:
        n = len(prefix)
        return {p[n] for p in self.paths if len(p) == n + 1 and p[:n] == prefix}

    def value(self, *path: str) -> str | None:
        assert path in self.paths, f"{'.'.join(path)} missing from the normalised compose file"
        return self.paths[path]


def _compose_command() -> list[str]:
    exe = shutil.which("docker-compose")
    if exe is not None:
        return [exe]
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=TIMEOUT_S
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    reason = f"neither docker-compose nor the docker compose plugin is on PATH ({INSTALL_HINT})"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _run(compose: Sequence[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), "config", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO,
        check=False,
    )


def _flatten(
    node: object,
    prefix: KeyPath,
    out: dict[KeyPath, str | None],
    sequences: dict[KeyPath, tuple[str, ...]],
) -> None:
    if isinstance(node, dict):
        for key, child in node.items():
            path = (*prefix, str(key))
            out[path] = None if isinstance(child, dict | list) else str(child)
            if isinstance(child, list):
                sequences[path] = tuple(str(i) for i in child if not isinstance(i, dict | list))
            _flatten(child, path, out, sequences)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_yaml(text: str) -> tuple[dict[KeyPath, str | None], dict[KeyPath, tuple[str, ...]]]:
    """Key paths of a block-style YAML document as `config` prints it, with their scalars, and
    the scalar items of its block sequences.

    A sequence item's continuation lines (a long plain scalar wrapped by `config`) are joined to
    it with single spaces, as YAML folds them; they are never read as keys. Items that are
    mappings are kept as their first line only: nothing checked here needs more.
    """
    paths: dict[KeyPath, str | None] = {}
    sequences: dict[KeyPath, list[str]] = {}
    stack: list[tuple[int, str]] = []
    item: tuple[int, list[str]] | None = None  # dash indentation, the items it belongs to
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if item is not None and line.strip() and indent > item[0]:
            item[1][-1] += " " + line.strip()
            continue
        item = None
        m_item = _YAML_ITEM.match(line)
        if m_item is not None:
            # Compose prints a sequence at its key's indentation; a deeper one also belongs to
            # the innermost key at a lower or equal indentation.
            while stack and stack[-1][0] > indent:
                stack.pop()
            items = sequences.setdefault(tuple(k for _, k in stack), [])
            items.append(_unquote(m_item["value"].strip()))
            item = (indent, items)
            continue
        m = _YAML_KEY.match(line)
        if m is None:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, _unquote(m["key"])))
        value = m["value"]
        paths[tuple(k for _, k in stack)] = None if value in (None, "") else _unquote(value)
    return paths, {path: tuple(items) for path, items in sequences.items()}


def parse_yaml_key_paths(text: str) -> dict[KeyPath, str | None]:
    """Key paths of a block-style YAML document as `config` prints it (mappings only)."""
    return parse_yaml(text)[0]


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
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE} is missing"
    compose = _compose_command()

    # Compose v2 prints JSON on request; v1.29 rejects the option (and then the YAML path below
    # still insists on exit status 0, so an invalid file cannot slip through either way).
    as_json = _run(compose, "--format", "json")
    if as_json.returncode == 0 and as_json.stdout.lstrip().startswith("{"):
        doc = json.loads(as_json.stdout)
        paths: dict[KeyPath, str | None] = {}
        sequences: dict[KeyPath, tuple[str, ...]] = {}
        _flatten(doc, (), paths, sequences)
        return ComposeConfig(frozenset(doc.get("services", {})), paths, sequences)

    as_yaml = _run(compose)
    assert as_yaml.returncode == 0, f"`config` rejected the file:\n{as_yaml.stderr}"
    names = _run(compose, "--services")
    assert names.returncode == 0, names.stderr
    services = frozenset(line.strip() for line in names.stdout.splitlines() if line.strip())
    paths, sequences = parse_yaml(as_yaml.stdout)
    assert services <= {p[1] for p in paths if len(p) >= 2 and p[0] == "services"}
    return ComposeConfig(services, paths, sequences)


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
