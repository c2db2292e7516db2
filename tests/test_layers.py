"""The architecture as import contracts ([tool.importlinter] in pyproject.toml): the processes
(api, audit, gateway, projector) over the libraries they share (producer, migrations) over the
core; siblings never import each other, the product never imports bench/, and no package's
modules import each other in a circle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.repo import REPO, clean_copy

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        # The tree under test first on the path, ahead of the editable install's finder.
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_contracts_hold() -> None:
    done = _lint(REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_sibling_import_breaks_the_layers(tmp_path: Path) -> None:
    copy = clean_copy(tmp_path / "repo")
    module = copy / "api" / "__init__.py"
    module.write_text(module.read_text() + "\nimport conntrack.projector.runner  # noqa\n")
    done = _lint(copy)
    assert done.returncode != 0
    assert "conntrack.api -> conntrack.projector" in done.stdout, done.stdout


def test_a_circle_breaks_the_acyclic_contract(tmp_path: Path) -> None:
    copy = clean_copy(tmp_path / "repo")
    module = copy / "core" / "events.py"
    module.write_text(module.read_text() + "\nimport conntrack.core.fold  # noqa\n")
    done = _lint(copy)
    assert done.returncode != 0
    assert "No cycles are allowed in conntrack.core" in done.stdout, done.stdout


def test_the_application_layer_knows_no_transport() -> None:
    """The services take a Call and raise ApiError (api/application/call.py): gRPC's servicer
    contexts and aiohttp stay in api/transport, so the REST mapping needs no stand-in for a
    gRPC context."""
    for path in sorted((REPO / "api" / "application").glob("*.py")):
        text = path.read_text()
        for word in ("ServicerContext", "grpc.aio", "aiohttp", "context.abort"):
            assert word not in text, f"{path.name} mentions {word}"
