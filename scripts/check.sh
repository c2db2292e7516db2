#!/usr/bin/env bash
# The fast path (make check): static checks, then the tests that need no broker and no
# database server (unit and property tests, the package and its layers). About a minute.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
bash scripts/lint.sh
echo "== pytest (fast)"
.venv/bin/pytest -q tests/unit tests/test_layers.py tests/test_packaging.py "$@"
