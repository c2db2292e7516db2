#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft, combined broker+controller) for development and
# tests, run from the official artifacts on Maven Central. No Docker needed.
#
#   infra/kafka.sh up | down | status | logs | reset
#   infra/kafka.sh tool NAME [ARGS...]   Kafka's own operator tools from the same artifacts, e.g.
#     infra/kafka.sh tool kafka-consumer-groups --describe --group conntrack-projector
#     infra/kafka.sh tool kafka-topics --describe --topic conntrack.events.v1
#   (NAME: kafka-consumer-groups, kafka-topics, kafka-get-offsets, kafka-console-consumer,
#   kafka-configs, kafka-metadata-quorum; --bootstrap-server defaults to this broker)
#
# Environment:
#   CONNTRACK_KAFKA_PORT        client listener port            (default 19092)
#   CONNTRACK_KAFKA_CTRL_PORT   KRaft controller listener port  (default port+1)
#   CONNTRACK_STATE_DIR         where state lives               (default <repo>/.local)
#   CONNTRACK_KAFKA_HEAP        JVM heap                        (default 768m)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
port="${CONNTRACK_KAFKA_PORT:-19092}"
ctrl_port="${CONNTRACK_KAFKA_CTRL_PORT:-$((port + 1))}"
state="${CONNTRACK_STATE_DIR:-$repo/.local}/kafka-$port"
heap="${CONNTRACK_KAFKA_HEAP:-768m}"
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/kafka/pom.xml")"
lib="${CONNTRACK_STATE_DIR:-$repo/.local}/kafka-dist-$version/lib"
pidfile="$state/broker.pid"

die() { echo "infra/kafka: $*" >&2; exit 1; }

need_tools() {
  command -v java >/dev/null 2>&1 ||
    die "Java 17+ is required to run the broker (Debian: apt-get install openjdk-17-jre-headless)."
  local major
  major="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/.*java.specification.version = \([0-9]*\).*/\1/p')"
  [ "${major:-0}" -ge 17 ] || die "Kafka $version needs Java 17 or newer; found Java ${major:-unknown}."
}

resolve_artifacts() {
  # A distribution resolved before the tools were added lacks them: resolve again.
  [ -f "$lib/.complete" ] && compgen -G "$lib/kafka-tools-[0-9]*.jar" >/dev/null && return 0
  command -v mvn >/dev/null 2>&1 ||
    die "Maven is required to fetch Kafka $version from Maven Central (Debian: apt-get install maven)."
  echo "infra/kafka: resolving org.apache.kafka:kafka_2.13:$version from Maven Central (cached in ~/.m2)"
  rm -rf "$lib"; mkdir -p "$lib"
  mvn -q -B -f "$here/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$lib" >"$lib/../maven.log" 2>&1 ||
    { tail -30 "$lib/../maven.log" >&2; die "Maven could not resolve the Kafka artifacts (log above)."; }
  touch "$lib/.complete"
}

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

java_cmd() {
  java -Xms256m -Xmx"$heap" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$here/kafka/log4j2.properties" -Dkafka.logs.dir="$state/logs" \
    -cp "$lib/*" "$@"
}

up() {
  need_tools
  if running; then echo "infra/kafka: already running on 127.0.0.1:$port (pid $(cat "$pidfile"))"; return 0; fi
  port_open "$port" && die "port $port is taken by another process; set CONNTRACK_KAFKA_PORT."
  resolve_artifacts
  mkdir -p "$state/logs" "$state/data"
  cat >"$state/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$ctrl_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctrl_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$state/data
num.partitions=3
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
PROPS
  if [ ! -f "$state/data/meta.properties" ]; then
    local cluster_id
    cluster_id="$(java_cmd kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
    java_cmd kafka.tools.StorageTool format -t "$cluster_id" -c "$state/server.properties" \
      >"$state/logs/format.log" 2>&1 || { cat "$state/logs/format.log" >&2; die "formatting storage failed"; }
  fi
  # setsid: the broker outlives the shell that started it (the demo leaves it running).
  setsid nohup java -Xms256m -Xmx"$heap" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$here/kafka/log4j2.properties" -Dkafka.logs.dir="$state/logs" \
    -cp "$lib/*" kafka.Kafka "$state/server.properties" >"$state/logs/stdout.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  echo -n "infra/kafka: starting Kafka $version (KRaft) on 127.0.0.1:$port "
  for _ in $(seq 1 120); do
    if grep -q "Kafka Server started" "$state/logs/server.log" 2>/dev/null && port_open "$port"; then
      echo " ready"; return 0
    fi
    running || { echo; tail -40 "$state/logs/stdout.log" "$state/logs/server.log" >&2 2>/dev/null; die "broker exited during start-up"; }
    echo -n "."; sleep 1
  done
  echo; die "broker not ready after 120 s; see $state/logs/server.log"
}

down() {
  if ! running; then echo "infra/kafka: not running"; rm -f "$pidfile"; return 0; fi
  local pid; pid="$(cat "$pidfile")"
  kill "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$pidfile"
  echo "infra/kafka: stopped"
}

status() {
  if running && port_open "$port"; then
    echo "infra/kafka: running Kafka $version on 127.0.0.1:$port (pid $(cat "$pidfile"), state $state)"
  else
    echo "infra/kafka: not running (port $port)"; return 3
  fi
}

tool() {
  local name="${1:-}"; shift || true
  local class
  case "$name" in
    kafka-consumer-groups) class=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
    kafka-topics) class=org.apache.kafka.tools.TopicCommand ;;
    kafka-get-offsets) class=org.apache.kafka.tools.GetOffsetShell ;;
    kafka-console-consumer) class=org.apache.kafka.tools.consumer.ConsoleConsumer ;;
    kafka-configs) class=kafka.admin.ConfigCommand ;;
    kafka-metadata-quorum) class=org.apache.kafka.tools.MetadataQuorumCommand ;;
    *) die "unknown tool '${name}'; one of: kafka-consumer-groups kafka-topics kafka-get-offsets kafka-console-consumer kafka-configs kafka-metadata-quorum" ;;
  esac
  need_tools
  resolve_artifacts
  local args=("$@")
  case " ${args[*]} " in
    *" --bootstrap-server "*|*" --bootstrap-server="*) ;;
    *) args=(--bootstrap-server "127.0.0.1:$port" "${args[@]}") ;;
  esac
  exec java -Xmx256m -Dlog4j2.configurationFile="$here/kafka/log4j2-tools.properties" \
    -cp "$lib/*" "$class" "${args[@]}"
}

case "${1:-}" in
  tool) shift; tool "$@" ;;
  up) up ;;
  down) down ;;
  status) status ;;
  logs) tail -n "${2:-100}" "$state/logs/server.log" ;;
  reset) down; rm -rf "$state"; echo "infra/kafka: state removed" ;;
  *) echo "usage: infra/kafka.sh up|down|status|logs|reset|tool NAME [ARGS...]" >&2; exit 2 ;;
esac
