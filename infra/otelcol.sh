#!/usr/bin/env bash
# A minimal OpenTelemetry Collector built from infra/otelcol (the collector's OTLP receiver and
# the contrib file exporter, pinned in its go.mod): OTLP/gRPC and HTTP in, OTLP JSON lines out.
#
#   infra/otelcol.sh build            # go build into .local/go/bin/conntrack-otelcol (if stale)
#   infra/otelcol.sh run FILE [PORT]  # receive on 127.0.0.1:PORT (default 4317), write to FILE
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$repo/.local/go/bin/conntrack-otelcol"
src="$repo/infra/otelcol"

build() {
  if [ -x "$bin" ] && [ -z "$(find "$src" -newer "$bin" -type f)" ]; then
    return 0
  fi
  echo "infra/otelcol: building $bin (the first build downloads the collector's modules)"
  mkdir -p "$(dirname "$bin")"
  (cd "$src" && go build -trimpath -o "$bin" .)
}

case "${1:-}" in
  build) build ;;
  run)
    build
    out="${2:?usage: infra/otelcol.sh run FILE [PORT]}"
    port="${3:-4317}"
    config="$(mktemp)"
    cat >"$config" <<YAML
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:$port
exporters:
  file:
    path: $out
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [file]
YAML
    exec "$bin" --config "file:$config"
    ;;
  *) echo "usage: infra/otelcol.sh build | run FILE [PORT]" >&2; exit 2 ;;
esac
