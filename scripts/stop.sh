#!/usr/bin/env bash
# Stop what `make demo` started: the gateway (SIGTERM: it closes its sockets with 1001 and
# publishes their disconnects), the lifecycle role, the API and the projector (they drain and
# exit), then Kafka.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for name in gateway lifecycle api projector; do
  pidfile="$repo/.local/run/$name.pid"
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    echo "stop: $name stopped"
  fi
  rm -f "$pidfile"
done
bash "$repo/infra/kafka.sh" down
bash "$repo/infra/postgres.sh" down
