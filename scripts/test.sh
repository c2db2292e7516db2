#!/usr/bin/env bash
# README command 2: provision real Kafka and PostgreSQL, then run linters, type checks and the
# whole test suite. Extra arguments go to pytest (e.g. scripts/test.sh -k fold).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/bootstrap.sh
bash infra/kafka.sh up
bash infra/postgres.sh up
export CONNTRACK_TEST_KAFKA="127.0.0.1:${CONNTRACK_KAFKA_PORT:-19092}"
export CONNTRACK_TEST_POSTGRES_URL="$(bash infra/postgres.sh url)"
echo "== ruff";  .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy";  .venv/bin/mypy
echo "== pytest"
.venv/bin/pytest "$@"
