#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv in .venv: the development tools and the runtime
# dependencies exactly as requirements-dev.lock pins them (hash-checked), then the project itself
# in editable mode with no further downloads. Skips the install when neither pyproject.toml nor
# the lock changed since the last one. `make lock` moves the pins on purpose.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  { echo "bootstrap: Python 3.11+ is required (found $("$python" --version 2>&1))" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$python" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml requirements-dev.lock | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing the locked dev tools and the project into .venv"
  # --no-build-isolation: the build backend comes from the lock too, not fetched unpinned.
  # The build backend's notices are noise on success; the log is shown when pip fails.
  { .venv/bin/python -m pip install -q --require-hashes -r requirements-dev.lock &&
    .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . &&
    .venv/bin/python -m pip check; } >.venv/pip.log 2>&1 ||
    { cat .venv/pip.log >&2; echo "bootstrap: pip install failed (log above)" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
fi
