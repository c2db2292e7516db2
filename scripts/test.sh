#!/usr/bin/env bash
# README command 2: provision real Kafka and PostgreSQL, then run linters, type checks and the
# whole test suite. Extra arguments go to pytest (e.g. scripts/test.sh -k fold).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/bootstrap.sh
bash infra/kafka.sh up
bash infra/postgres.sh up
# tests/test_docker_compose.py validates docker-compose.yml with Debian's docker-compose (no
# engine needed); --no-install-recommends keeps the Docker daemon off the machine.
if ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "test: installing docker-compose (validation only)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose >/dev/null; }
fi
# promtool (Debian's prometheus package), for tests/test_alert_rules.py; the server it also
# installs is not started (no init system runs it here).
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "test: installing promtool (Debian's prometheus package)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
fi
# grpcurl, for the test that calls the API the way operators do (reflection, no .proto files).
if [ ! -x .local/go/bin/grpcurl ] && ! command -v grpcurl >/dev/null 2>&1 && command -v go >/dev/null 2>&1; then
  echo "test: installing grpcurl into .local/go/bin"
  GOBIN="$repo/.local/go/bin" go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4 ||
    echo "test: grpcurl could not be installed; its test will be skipped" >&2
fi
# buf, for tests/test_schemas.py (lint and breaking-change checks of the topics' schemas).
if [ ! -x .local/go/bin/buf ] && ! command -v buf >/dev/null 2>&1 && command -v go >/dev/null 2>&1; then
  echo "test: installing buf into .local/go/bin"
  GOBIN="$repo/.local/go/bin" go install github.com/bufbuild/buf/cmd/buf@v1.75.0 ||
    echo "test: buf could not be installed; its tests will fail" >&2
fi
# The Go gateway (examples/go-gateway), which the conformance kit judges beside the Python one.
if command -v go >/dev/null 2>&1; then
  (cd examples/go-gateway && go build -trimpath -o "$repo/.local/go/bin/conntrack-go-gateway" .) ||
    echo "test: the Go gateway could not be built; its tests will fail" >&2
fi
# A minimal OpenTelemetry Collector (infra/otelcol: OTLP in, JSON lines out), for the test that
# follows a Send's trace across the processes.
if command -v go >/dev/null 2>&1; then
  bash infra/otelcol.sh build || echo "test: the collector could not be built; its test will fail" >&2
fi
export CONNTRACK_TEST_KAFKA="127.0.0.1:${CONNTRACK_KAFKA_PORT:-19092}"
export CONNTRACK_TEST_POSTGRES_URL="$(bash infra/postgres.sh url)"
bash scripts/lint.sh
echo "== pytest"
.venv/bin/pytest "$@"
