#!/usr/bin/env bash
# README command 1: run the whole system on the embedded default (SQLite read model) and show it
# working. Leaves Kafka, the projector and the API running; `make stop` stops them.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
run="$repo/.local/run"
mkdir -p "$run"

bash scripts/bootstrap.sh
bash infra/kafka.sh up

export CONNTRACK_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:${CONNTRACK_KAFKA_PORT:-19092}"
export CONNTRACK_DATABASE_URL="${CONNTRACK_DATABASE_URL:-sqlite+aiosqlite:///$repo/.local/readmodel.db}"
export CONNTRACK_API_LISTEN="${CONNTRACK_API_LISTEN:-127.0.0.1:50051}"
bin="$repo/.venv/bin"

echo "demo: provisioning topics"
"$bin/conntrack-producer" topics
echo "demo: migrating the read model ($CONNTRACK_DATABASE_URL)"
"$bin/conntrack-migrate" upgrade head 2>&1 | grep -v "^INFO" || true

start() {  # name, command...
  local name=$1; shift
  if [ -f "$run/$name.pid" ] && kill -0 "$(cat "$run/$name.pid")" 2>/dev/null; then
    echo "demo: $name already running (pid $(cat "$run/$name.pid"))"; return
  fi
  setsid nohup "$@" >"$run/$name.log" 2>&1 </dev/null &
  echo $! >"$run/$name.pid"
  echo "demo: started $name (pid $!, log .local/run/$name.log)"
}
start projector "$bin/conntrack-projector"
start api "$bin/conntrack-api" serve

echo "demo: publishing a simulated gateway workload"
out="$("$bin/conntrack-producer" simulate --connections 50 --seed "$RANDOM")"
echo "$out"
cid="$(sed -n 's/^an open connection: //p' <<<"$out")"
[ -n "$cid" ] || { echo "demo: the simulation left no open connection" >&2; exit 1; }

echo "demo: ConnectionService.Get for $cid"
for _ in $(seq 1 100); do
  if "$bin/conntrack-api" get "$cid" 2>/dev/null; then
    cat <<TXT

The stack is running: Kafka on $CONNTRACK_KAFKA_BOOTSTRAP_SERVERS, the projector, and the gRPC API
on $CONNTRACK_API_LISTEN. Try:   .venv/bin/conntrack-api get $cid
Stop everything with:            make stop
TXT
    exit 0
  fi
  sleep 0.3
done
echo "demo: the connection did not appear within 30 s; see .local/run/*.log" >&2
exit 1
