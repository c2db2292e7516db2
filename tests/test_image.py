"""The container image and the development environment are reproducible: hashed lock files that
match pyproject.toml, a Dockerfile and a bootstrap that install from them, and a pinned base image.

`make lock` regenerates requirements.lock (runtime dependencies), requirements-build.lock (pip
and the build backend) and requirements-dev.lock (both, plus the dev extra). Everything here is
offline except the last test, which asks pip to resolve the image's locks for Linux x86_64 and
aarch64 (metadata and a few small downloads, a few seconds); it is skipped when the package index
cannot be reached (outside CI).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
BUILD_LOCK = REPO / "requirements-build.lock"
DEV_LOCK = REPO / "requirements-dev.lock"
DOCKERFILE = REPO / "Dockerfile"
STALE = "stale: run `make lock`"
PROJECT = "ws-connection-tracker (pyproject.toml)"

# `name==version [; marker] \` then `--hash=sha256:...` lines, then `# via ...` comments.
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)")
_HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Pin:
    version: str
    hashes: int
    via: frozenset[str]


def _pyproject() -> dict[str, object]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def runtime_requirements() -> list[Requirement]:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    return [Requirement(r) for r in project["dependencies"]]


def dev_requirements() -> list[Requirement]:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    return [Requirement(r) for r in project["optional-dependencies"]["dev"]]


def build_requirements() -> list[Requirement]:
    build_system = _pyproject()["build-system"]
    assert isinstance(build_system, dict)
    return [Requirement(r) for r in build_system["requires"]]


def parse_lock(path: Path) -> dict[str, Pin]:
    """Canonical name -> pin. Every logical line must be a `==` pin followed by its hashes."""
    assert path.is_file(), f"{path.name} is missing: run `make lock`"
    pins: dict[str, Pin] = {}
    name: str | None = None
    version = ""
    hashes = 0
    via: set[str] = set()

    def finish() -> None:
        if name is not None:
            assert hashes > 0, f"{path.name}: {name} has no --hash"
            pins[name] = Pin(version, hashes, frozenset(via))

    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line:
            continue
        if raw.startswith("#"):
            continue  # the header
        if line.startswith("#"):
            via.add(re.sub(r"^via\b", "", line.lstrip("#").strip()).strip())
            continue
        if not raw.startswith(" "):
            finish()
            m = _PIN.match(line)
            assert m is not None, f"{path.name}: not an exact pin: {line!r}"
            assert line.endswith("\\"), f"{path.name}: {line!r} has no hashes"
            name, version, hashes, via = canonicalize_name(m["name"]), m["version"], 0, set()
            continue
        assert _HASH.fullmatch(line.rstrip(" \\")), f"{path.name}: unexpected line {line!r}"
        hashes += 1
    finish()
    return pins


def test_lock_parser(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    lock.write_text(
        "# header\n"
        "Foo_Bar==1.2 ; python_full_version < '3.12' \\\n"
        f"    --hash=sha256:{'a' * 64} \\\n"
        f"    --hash=sha256:{'b' * 64}\n"
        "    # via\n"
        f"    #   {PROJECT}\n"
        "    #   baz\n"
    )
    assert parse_lock(lock) == {"foo-bar": Pin("1.2", 2, frozenset({"", PROJECT, "baz"}))}
    lock.write_text("foo>=1\n")
    with pytest.raises(AssertionError, match="not an exact pin"):
        parse_lock(lock)
    lock.write_text("foo==1\n")
    with pytest.raises(AssertionError, match="no hashes"):
        parse_lock(lock)


def test_every_runtime_dependency_is_pinned_with_hashes() -> None:
    pins = parse_lock(LOCK)
    for req in runtime_requirements():
        pin = pins.get(canonicalize_name(req.name))
        assert pin is not None, f"requirements.lock has no {req.name}: {STALE}"
        assert req.specifier.contains(pin.version, prereleases=True), (
            f"requirements.lock pins {req.name}=={pin.version}, pyproject.toml wants {req}: {STALE}"
        )


def test_lock_names_no_dependency_pyproject_dropped() -> None:
    # uv marks the packages pyproject.toml asks for directly; a dropped one must not linger.
    direct = {name for name, pin in parse_lock(LOCK).items() if PROJECT in pin.via}
    wanted = {canonicalize_name(r.name) for r in runtime_requirements()}
    assert direct == wanted, f"{STALE} (lock: {sorted(direct)}, pyproject: {sorted(wanted)})"


def test_lock_holds_no_dev_tools() -> None:
    dev = {canonicalize_name(r.name) for r in dev_requirements()}
    leaked = dev & set(parse_lock(LOCK))
    assert not leaked, f"dev extras in requirements.lock: {sorted(leaked)}"


def test_build_lock_pins_pip_and_the_build_backend() -> None:
    pins = parse_lock(BUILD_LOCK)
    assert "pip" in pins
    for req in build_requirements():
        pin = pins.get(canonicalize_name(req.name))
        assert pin is not None, f"requirements-build.lock has no {req.name}: {STALE}"
        assert req.specifier.contains(pin.version, prereleases=True), f"{req}: {STALE}"


def test_dev_lock_satisfies_every_constraint_of_pyproject() -> None:
    """The drift check of the development tools: a constraint changed in pyproject.toml without
    `make lock` fails here, not on a fresh clone's type check."""
    pins = parse_lock(DEV_LOCK)
    for req in [*runtime_requirements(), *dev_requirements(), *build_requirements()]:
        pin = pins.get(canonicalize_name(req.name))
        assert pin is not None, f"requirements-dev.lock has no {req.name}: {STALE}"
        assert req.specifier.contains(pin.version, prereleases=True), (
            f"requirements-dev.lock pins {req.name}=={pin.version}, pyproject.toml wants {req}: "
            f"{STALE}"
        )
    direct = {name for name, pin in pins.items() if PROJECT in pin.via}
    wanted = {canonicalize_name(r.name) for r in [*runtime_requirements(), *dev_requirements()]}
    assert direct == wanted, f"{STALE} (lock: {sorted(direct)}, pyproject: {sorted(wanted)})"


def test_dev_lock_agrees_with_the_image_locks() -> None:
    """Tests run on the versions the image ships: every pin of requirements.lock and
    requirements-build.lock is in requirements-dev.lock at the same version."""
    dev = parse_lock(DEV_LOCK)
    for lock in (LOCK, BUILD_LOCK):
        for name, pin in parse_lock(lock).items():
            got = dev.get(name)
            assert got is not None, f"requirements-dev.lock has no {name}: {STALE}"
            assert got.version == pin.version, (
                f"{lock.name} pins {name}=={pin.version}, requirements-dev.lock "
                f"{got.version}: {STALE}"
            )


def test_bootstrap_installs_from_the_dev_lock() -> None:
    script = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert re.search(r"pip install .*--require-hashes -r requirements-dev\.lock", script)
    assert re.search(r"pip install .*--no-deps --no-build-isolation -e \.", script)
    # A changed lock reinstalls, as a changed pyproject.toml does.
    assert re.search(r"stamp=.*requirements-dev\.lock", script)


def _dockerfile_instructions() -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    out: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        out.append(" ".join(pending.split()))
        pending = ""
    return out


def test_dockerfile_installs_from_the_locks_before_the_source() -> None:
    steps = _dockerfile_instructions()

    def index(predicate: str) -> int:
        hits = [i for i, s in enumerate(steps) if re.search(predicate, s)]
        assert hits, f"no Dockerfile instruction matches {predicate!r}"
        return hits[0]

    copy_locks = index(r"^COPY (?=.*requirements\.lock)(?=.*requirements-build\.lock)")
    build_tools = index(r"^RUN .*pip install --require-hashes .*-r requirements-build\.lock")
    deps = index(r"^RUN .*pip .*install --require-hashes .*-r requirements\.lock")
    source = index(r"^COPY \. \.")
    project = index(r"^RUN .*install --no-deps ")
    assert copy_locks < build_tools < source
    assert copy_locks < deps < source < project, "dependencies must be a layer of their own"
    # Wheels only: an sdist would build with an unpinned backend fetched behind the lock's back.
    assert "--only-binary :all:" in steps[deps]
    assert "--only-binary :all:" in steps[build_tools]
    assert "--no-build-isolation" in steps[project]
    assert "check" in steps[project].split("&&")[-1]


def test_dockerfile_base_image_is_pinned() -> None:
    steps = _dockerfile_instructions()
    args = dict(
        s.removeprefix("ARG ").split("=", 1) for s in steps if s.startswith("ARG ") and "=" in s
    )
    froms = [s.split()[1] for s in steps if s.startswith("FROM ")]
    assert froms
    for ref in froms:
        if ref in ("build",):
            continue
        image = args.get(ref.strip("${}"), ref)
        # python:3.11.16-slim-trixie: Python's patch release and Debian's release, or a digest.
        assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image) or (
            re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", image)
        ), f"base image {image!r} is not pinned"


def test_dockerignore_keeps_what_the_build_needs() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in ("requirements.lock", "requirements-build.lock", "docker", "pyproject.toml"):
        assert needed not in ignored, f".dockerignore drops {needed}, which the Dockerfile copies"


def _index_reachable() -> bool:
    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/") + "/pip/"
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_locks_resolve_completely_from_wheels(arch: str, tmp_path: Path) -> None:
    """pip, in hash-checking mode, for the image's platform: every dependency of every pin (and
    of the extras pyproject.toml asks for) must be in the lock with a matching hash, and every
    pin must have a wheel for CPython 3.11 on manylinux."""
    if not _index_reachable():
        reason = "the package index is not reachable"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    # The lock names `sqlalchemy`, not `sqlalchemy[asyncio]`: write the extras back so that pip
    # also insists on their dependencies (greenlet).
    extras = {canonicalize_name(r.name): sorted(r.extras) for r in runtime_requirements()}
    lines = []
    for line in LOCK.read_text().splitlines():
        m = _PIN.match(line)
        wanted = extras.get(canonicalize_name(m["name"])) if m is not None else None
        if m is not None and wanted:
            line = f"{m['name']}[{','.join(wanted)}]{line[m.end('name') :]}"
        lines.append(line)
    with_extras = tmp_path / "requirements.lock"
    with_extras.write_text("\n".join(lines) + "\n")

    platforms = [f"manylinux_2_{glibc}_{arch}" for glibc in range(17, 42)]
    for lock in (with_extras, BUILD_LOCK):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--retries",
                "1",
                "--timeout",
                "30",
                "--require-hashes",
                "--only-binary",
                ":all:",
                *(arg for p in platforms for arg in ("--platform", p)),
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--abi",
                "cp311",
                "-r",
                str(lock),
            ],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert done.returncode == 0, f"{lock.name} for {arch}: {STALE}?\n{done.stderr}"
