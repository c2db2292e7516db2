"""docker-compose.yml stays a valid Compose file that wires the services together.

`docker-compose config` (Compose v1.29, Debian's `docker-compose` package) or `docker compose
config` (v2) parses, validates and normalises the file without needing a Docker engine. v2 can
print JSON; v1.29 prints only YAML, which is read here with a small parser of its normalised block
layout, so the tests need no YAML library.
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


@dataclass(frozen=True)
class ComposeConfig:
    """What `config` printed: the service names and every mapping key path with its scalar."""

    services: frozenset[str]
    paths: Mapping[KeyPath, str | None]

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


def _flatten(node: object, prefix: KeyPath, out: dict[KeyPath, str | None]) -> None:
    if isinstance(node, dict):
        for key, child in node.items():
            path = (*prefix, str(key))
            out[path] = None if isinstance(child, dict | list) else str(child)
            _flatten(child, path, out)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_yaml_key_paths(text: str) -> dict[KeyPath, str | None]:
    """Key paths of a block-style YAML document as `config` prints it (mappings only).

    Sequence items and continuation lines of folded scalars are skipped: nothing checked here
    lives inside a sequence, and skipping them cannot attach a key to the wrong parent.
    """
    out: dict[KeyPath, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = _YAML_KEY.match(line)
        if m is None:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, _unquote(m["key"])))
        value = m["value"]
        out[tuple(k for _, k in stack)] = None if value in (None, "") else _unquote(value)
    return out


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
        _flatten(doc, (), paths)
        return ComposeConfig(frozenset(doc.get("services", {})), paths)

    as_yaml = _run(compose)
    assert as_yaml.returncode == 0, f"`config` rejected the file:\n{as_yaml.stderr}"
    names = _run(compose, "--services")
    assert names.returncode == 0, names.stderr
    services = frozenset(line.strip() for line in names.stdout.splitlines() if line.strip())
    paths = parse_yaml_key_paths(as_yaml.stdout)
    assert services <= {p[1] for p in paths if len(p) >= 2 and p[0] == "services"}
    return ComposeConfig(services, paths)


def test_all_services_are_defined(compose_config: ComposeConfig) -> None:
    expected = {"kafka", "postgres", "topics", "migrate", "projector", "api"}
    missing = expected - compose_config.services
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


def test_app_services_get_their_connection_settings(compose_config: ComposeConfig) -> None:
    projector_env = compose_config.keys_under("services", "projector", "environment")
    api_env = compose_config.keys_under("services", "api", "environment")
    assert {"CONNTRACK_DATABASE_URL", "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS"} <= projector_env
    assert {"CONNTRACK_DATABASE_URL", "CONNTRACK_API_LISTEN"} <= api_env

    for service in ("projector", "api", "migrate"):
        url = compose_config.value("services", service, "environment", "CONNTRACK_DATABASE_URL")
        assert url is not None
        assert url.startswith("postgresql+asyncpg://"), url
        assert "@postgres:5432/" in url, url
    for service in ("projector", "topics"):
        servers = compose_config.value(
            "services", service, "environment", "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS"
        )
        assert servers == "kafka:9092"
    # Inside a container a loopback listener would be unreachable through the published port.
    listen = compose_config.value("services", "api", "environment", "CONNTRACK_API_LISTEN")
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
    # service_healthy is only meaningful with a healthcheck to wait for.
    for service in ("kafka", "postgres"):
        assert compose_config.keys_under("services", service, "healthcheck") >= {"test"}
