#!/usr/bin/env bash
# Static checks, as make check and make test run them: ruff (lint and format), mypy (strict),
# and the import contracts of pyproject.toml's [tool.importlinter] (the layers).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== import contracts"
.venv/bin/lint-imports --no-cache | sed -n '/^Contracts:/p'
test "${PIPESTATUS[0]}" -eq 0
