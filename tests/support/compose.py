"""docker-compose.yml as Compose itself reads it: `docker-compose config` (Compose v1.29, Debian's
`docker-compose` package) or `docker compose config` (v2) parses, validates and normalises the
file without needing a Docker engine. v2 can print JSON; v1.29 prints only YAML, which is read
here with a small parser of its normalised block layout, so the tests need no YAML library."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest

from tests.support.repo import REPO

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


def _run(
    compose: Sequence[str], *args: str, before: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), *before, "config", *args],
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


def load_compose_config(*args: str) -> ComposeConfig:
    """docker-compose.yml as `config` normalises it (extra arguments, e.g. `--profile demo`, go
    before `config`)."""
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE} is missing"
    compose = _compose_command()

    # Compose v2 prints JSON on request; v1.29 rejects the option (and then the YAML path below
    # still insists on exit status 0, so an invalid file cannot slip through either way).
    as_json = _run(compose, "--format", "json", before=args)
    if as_json.returncode == 0 and as_json.stdout.lstrip().startswith("{"):
        doc = json.loads(as_json.stdout)
        paths: dict[KeyPath, str | None] = {}
        sequences: dict[KeyPath, tuple[str, ...]] = {}
        _flatten(doc, (), paths, sequences)
        return ComposeConfig(frozenset(doc.get("services", {})), paths, sequences)

    as_yaml = _run(compose, before=args)
    assert as_yaml.returncode == 0, f"`config` rejected the file:\n{as_yaml.stderr}"
    names = _run(compose, "--services", before=args)
    assert names.returncode == 0, names.stderr
    services = frozenset(line.strip() for line in names.stdout.splitlines() if line.strip())
    paths, sequences = parse_yaml(as_yaml.stdout)
    assert services <= {p[1] for p in paths if len(p) >= 2 and p[0] == "services"}
    return ComposeConfig(services, paths, sequences)
