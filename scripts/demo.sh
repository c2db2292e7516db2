#!/usr/bin/env bash
# README command 1: run the whole system on the embedded default (SQLite read model) and show it
# working: a simulated workload answered by Get, then a real WebSocket client on the reference
# gateway that the API finds, sends a message to and disconnects. Leaves Kafka, the projector,
# the API and the gateway running; `make stop` stops them.
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
# The lifecycle role: every connection's opened and closed, once, on conntrack.lifecycle.v1.
start lifecycle "$bin/conntrack-lifecycle"
# The reference gateway: a node that publishes its sockets' events and executes Send/Disconnect.
export CONNTRACK_GATEWAY_NODE_ID="${CONNTRACK_GATEWAY_NODE_ID:-demo-node}"
export CONNTRACK_GATEWAY_LISTEN="${CONNTRACK_GATEWAY_LISTEN:-127.0.0.1:$(
  "$bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
)}"
start gateway "$bin/conntrack-gateway"

echo "demo: publishing a simulated gateway workload"
out="$("$bin/conntrack-producer" simulate --connections 50 --seed "$RANDOM")"
echo "$out"
cid="$(sed -n 's/^an open connection: //p' <<<"$out")"
[ -n "$cid" ] || { echo "demo: the simulation left no open connection" >&2; exit 1; }

echo "demo: ConnectionService.Get for $cid"
found=""
for _ in $(seq 1 100); do
  if "$bin/conntrack-api" get "$cid" 2>/dev/null; then found=1; break; fi
  sleep 0.3
done
[ -n "$found" ] || { echo "demo: the connection did not appear within 30 s; see .local/run/*.log" >&2; exit 1; }

# wait_for NAME PATTERN: until the service's log has the line (or it died / 30 s passed).
wait_for() {
  for _ in $(seq 1 150); do
    grep -q "$2" "$run/$1.log" 2>/dev/null && return 0
    kill -0 "$(cat "$run/$1.pid")" 2>/dev/null || break
    sleep 0.2
  done
  echo "demo: $1 is not ready; see .local/run/$1.log:" >&2; tail -5 "$run/$1.log" >&2; exit 1
}
wait_for gateway "^listening on ws://"
wait_for api "event=command_channel_ready"
url="$(sed -n 's/^listening on \(ws:[^ ]*\) .*/\1/p' "$run/gateway.log" | tail -1)"
echo
echo "demo: a WebSocket client on the gateway ($url, node $CONNTRACK_GATEWAY_NODE_ID): Get, Send, Disconnect"
"$bin/python" scripts/demo_client.py "$url" ||
  { echo "demo: the client's round trip failed; see .local/run/*.log" >&2; exit 1; }

cat <<TXT

The stack is running: Kafka on $CONNTRACK_KAFKA_BOOTSTRAP_SERVERS, the projector, the gRPC API on
$CONNTRACK_API_LISTEN, the lifecycle role (the stream: conntrack.lifecycle.v1, docs/lifecycle.md)
and the gateway on $url (node $CONNTRACK_GATEWAY_NODE_ID). Try:
  .venv/bin/conntrack-api get $cid
  .venv/bin/python scripts/demo_client.py $url
Stop everything with:  make stop
TXT
