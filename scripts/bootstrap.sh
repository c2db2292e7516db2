#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv in .venv with the package and its dev extras.
# Skips the install when pyproject.toml has not changed since the last one.
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
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing the project and its dev tools into .venv"
  # The build backend's notices are noise on success; the log is shown when pip fails.
  { .venv/bin/python -m pip install -q --upgrade pip &&
    .venv/bin/python -m pip install -q -e '.[dev]'; } >.venv/pip.log 2>&1 ||
    { cat .venv/pip.log >&2; echo "bootstrap: pip install failed (log above)" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
fi
