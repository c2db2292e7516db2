"""What `pip install` of the project puts on a machine: one import package, `conntrack`, typed,
licensed, with its console scripts and the migrations' data files; and the layers inside it.

The wheel is built from a copy of the work tree as a clone would have it (tracked and
not-ignored files, links kept as links), with the build backend of the lock, offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import conntrack
from tests.support.repo import REPO, clean_copy

SCRIPTS = {
    "conntrack-api": "conntrack.api.__main__:main",
    "conntrack-audit": "conntrack.audit.__main__:main",
    "conntrack-gateway": "conntrack.gateway.__main__:main",
    "conntrack-lifecycle": "conntrack.lifecycle.__main__:main",
    "conntrack-conformance": "conntrack.conformance.__main__:main",
    "conntrack-migrate": "conntrack.migrations.cli:main",
    "conntrack-producer": "conntrack.producer.__main__:main",
    "conntrack-projector": "conntrack.projector.__main__:main",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = clean_copy(tmp / "src")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(tmp / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (built,) = (tmp / "dist").glob("*.whl")
    return built


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_wheel_installs_one_top_level_import_package(wheel: Path) -> None:
    tops = {name.split("/", 1)[0] for name in _names(wheel)}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"conntrack"}
    with zipfile.ZipFile(wheel) as z:
        (top_level,) = [n for n in z.namelist() if n.endswith(".dist-info/top_level.txt")] or [""]
        if top_level:
            assert z.read(top_level).decode().split() == ["conntrack"]


def test_wheel_is_typed_and_licensed(wheel: Path) -> None:
    names = set(_names(wheel))
    assert "conntrack/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    with zipfile.ZipFile(wheel) as z:
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = z.read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text


def test_wheel_carries_every_subpackage_and_the_migrations(wheel: Path) -> None:
    names = set(_names(wheel))
    for package in (
        "api",
        "audit",
        "conformance",
        "core",
        "gateway",
        "lifecycle",
        "migrations",
        "producer",
        "projector",
    ):
        assert f"conntrack/{package}/__init__.py" in names
    assert "conntrack/core/protogen/conntrack/events/v1/events_pb2.py" in names
    assert "conntrack/core/protogen/conntrack/lifecycle/v1/lifecycle_pb2.py" in names
    versions = {n for n in names if n.startswith("conntrack/migrations/versions/")}
    in_repo = {p.name for p in (REPO / "migrations" / "versions").glob("*.py")}
    assert {Path(n).name for n in versions} == in_repo
    assert "conntrack/migrations/script.py.mako" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/")) or "/tests/" in n]


def test_wheel_console_scripts(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        (entry_points,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = z.read(entry_points).decode()
    scripts = {
        k.strip(): v.strip()
        for line in text.split("[console_scripts]", 1)[1].strip().splitlines()
        if "=" in line and not line.startswith("[")
        for k, v in [line.split("=", 1)]
    }
    assert scripts == SCRIPTS


def test_installed_wheel_imports_from_its_own_files(wheel: Path, tmp_path: Path) -> None:
    """Unpacked on its own (no work tree on the path), the package and its migrations load."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    code = (
        "import conntrack, conntrack.migrations.cli as m, conntrack.api.__main__;"
        "from conntrack import Publisher, NodeCommands, Connected;"
        "print(conntrack.__file__); print(m.SCRIPT_LOCATION)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    package_file, script_location = done.stdout.split()
    assert Path(package_file).is_relative_to(site)
    assert Path(script_location).is_relative_to(site)
    assert (Path(script_location) / "env.py").is_file()


def test_public_api_names_resolve_to_their_homes() -> None:
    import conntrack.core.events as events
    import conntrack.producer.command_execution as execution
    import conntrack.producer.commands as commands
    import conntrack.producer.errors as errors
    import conntrack.producer.publisher as publisher

    homes = (events, execution, commands, errors, publisher)
    for name in conntrack.__all__:
        value = getattr(conntrack, name)
        assert any(getattr(home, name, None) is value for home in homes), name
        assert name in dir(conntrack)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = conntrack.nope


def test_the_core_does_not_load_the_kafka_client() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, conntrack.core.events, conntrack.core.fold;"
            "print('aiokafka' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "False"
