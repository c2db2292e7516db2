#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft, combined broker+controller) for development and
# tests, run from the official artifacts on Maven Central. No Docker needed.
#
#   infra/kafka.sh up | down | status | logs | reset
#   infra/kafka.sh cluster up [N] | down | status | kill I | start I | ...   a local N-node
#     (default 3) KRaft cluster on ports 19193.. (infra/kafka_cluster.sh has the commands)
#   infra/kafka.sh tool NAME [ARGS...]   Kafka's own operator tools from the same artifacts, e.g.
#     infra/kafka.sh tool kafka-consumer-groups --describe --group conntrack-projector
#     infra/kafka.sh tool kafka-topics --describe --topic conntrack.events.v1
#   (NAME: kafka-consumer-groups, kafka-topics, kafka-get-offsets, kafka-console-consumer,
#   kafka-configs, kafka-metadata-quorum; --bootstrap-server defaults to this broker)
#
# Environment:
#   CONNTRACK_KAFKA_SECURITY    plaintext or sasl_ssl           (default plaintext)
#   CONNTRACK_KAFKA_PORT        client listener port            (default 19092; sasl_ssl: 19094)
#   CONNTRACK_KAFKA_CTRL_PORT   KRaft controller listener port  (default port+1)
#   CONNTRACK_STATE_DIR         where state lives               (default <repo>/.local)
#   CONNTRACK_KAFKA_HEAP        JVM heap                        (default 768m)
#
# Secured mode, a broker like a managed Kafka (its own port and state, beside the plain one):
#   CONNTRACK_KAFKA_SECURITY=sasl_ssl infra/kafka.sh up
# starts a broker whose client listener (127.0.0.1:19094) speaks SASL_SSL with SCRAM-SHA-512.
# The first `up` makes, under <state>/kafka-sasl_ssl-19094/:
#   tls/ca.pem            the CA that signed the broker's certificate (CN/SAN 127.0.0.1,
#                         localhost): clients' CONNTRACK_KAFKA_SSL_CAFILE
#   secrets/conntrack.password, secrets/admin.password
#                         the SCRAM users' passwords (random; `conntrack` for clients, `admin`
#                         for the broker itself), added with kafka-storage format --add-scram
#   client.env            CONNTRACK_KAFKA_* lines for this project's commands (`. client.env`)
#   client.properties     the same for Kafka's own tools (--command-config)
# `CONNTRACK_KAFKA_SECURITY=sasl_ssl infra/kafka.sh env` prints client.env.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
security="${CONNTRACK_KAFKA_SECURITY:-plaintext}"
case "$security" in
  plaintext) port="${CONNTRACK_KAFKA_PORT:-19092}" ;;
  sasl_ssl) port="${CONNTRACK_KAFKA_PORT:-19094}" ;;
  *) echo "infra/kafka: CONNTRACK_KAFKA_SECURITY=$security: use plaintext or sasl_ssl" >&2; exit 2 ;;
esac
ctrl_port="${CONNTRACK_KAFKA_CTRL_PORT:-$((port + 1))}"
if [ "$security" = plaintext ]; then
  state="${CONNTRACK_STATE_DIR:-$repo/.local}/kafka-$port"
else
  state="${CONNTRACK_STATE_DIR:-$repo/.local}/kafka-$security-$port"
fi
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

# Secured mode (CONNTRACK_KAFKA_SECURITY=sasl_ssl): the CA, the broker's certificate, the SCRAM
# users' passwords and the clients' settings, made once per state directory and kept.
secured_material() {
  command -v openssl >/dev/null 2>&1 ||
    die "openssl is required for the secured broker (Debian: apt-get install openssl)."
  local tls="$state/tls" secrets="$state/secrets"
  mkdir -p "$tls" "$secrets"
  chmod 700 "$secrets"
  [ -s "$secrets/admin.password" ] || openssl rand -hex 16 >"$secrets/admin.password"
  [ -s "$secrets/conntrack.password" ] || openssl rand -hex 16 >"$secrets/conntrack.password"
  [ -s "$secrets/keystore.password" ] || openssl rand -hex 16 >"$secrets/keystore.password"
  chmod 600 "$secrets"/*.password
  if [ ! -s "$tls/broker.p12" ]; then
    (
      cd "$tls"
      openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=conntrack dev CA" \
        -keyout ca.key -out ca.pem
      openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout broker.key -out broker.csr
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >broker.ext
      openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile broker.ext -out broker.pem
      # PKCS12 for the broker's keystore; Java 17 reads OpenSSL 3's default PKCS12.
      openssl pkcs12 -export -in broker.pem -inkey broker.key -certfile ca.pem -name broker \
        -passout "file:$secrets/keystore.password" -out broker.p12
      chmod 600 ca.key broker.key broker.p12
    ) >"$state/logs/tls.log" 2>&1 || { cat "$state/logs/tls.log" >&2; die "making the TLS material failed"; }
  fi
  cat >"$state/client.env" <<ENV
CONNTRACK_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$port
CONNTRACK_KAFKA_SECURITY_PROTOCOL=SASL_SSL
CONNTRACK_KAFKA_SASL_MECHANISM=SCRAM-SHA-512
CONNTRACK_KAFKA_SASL_USERNAME=conntrack
CONNTRACK_KAFKA_SASL_PASSWORD_FILE=$secrets/conntrack.password
CONNTRACK_KAFKA_SSL_CAFILE=$tls/ca.pem
ENV
  cat >"$state/client.properties" <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(cat "$secrets/admin.password")";
ssl.truststore.type=PEM
ssl.truststore.location=$tls/ca.pem
PROPS
  chmod 600 "$state/client.properties"
}

# The client listener speaks SASL_SSL (SCRAM-SHA-512), the broker's own connections too (as
# admin); the controller listener stays PLAINTEXT on loopback.
secured_properties() {
  local tls="$state/tls" secrets="$state/secrets"
  sed -i \
    -e "s|^listeners=.*|listeners=SASL_SSL://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctrl_port|" \
    -e "s|^advertised.listeners=.*|advertised.listeners=SASL_SSL://127.0.0.1:$port|" \
    -e "s|^inter.broker.listener.name=.*|inter.broker.listener.name=SASL_SSL|" \
    -e "s|^listener.security.protocol.map=.*|listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT|" \
    "$state/server.properties"
  cat >>"$state/server.properties" <<PROPS
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(cat "$secrets/admin.password")";
ssl.keystore.type=PKCS12
ssl.keystore.location=$tls/broker.p12
ssl.keystore.password=$(cat "$secrets/keystore.password")
ssl.truststore.type=PEM
ssl.truststore.location=$tls/ca.pem
ssl.client.auth=none
super.users=User:admin
PROPS
  chmod 600 "$state/server.properties"
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
  local scram=()
  if [ "$security" = sasl_ssl ]; then
    secured_material
    secured_properties
    scram=(--add-scram "SCRAM-SHA-512=[name=admin,password=$(cat "$state/secrets/admin.password")]"
      --add-scram "SCRAM-SHA-512=[name=conntrack,password=$(cat "$state/secrets/conntrack.password")]")
  fi
  if [ ! -f "$state/data/meta.properties" ]; then
    local cluster_id
    cluster_id="$(java_cmd kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
    java_cmd kafka.tools.StorageTool format -t "$cluster_id" -c "$state/server.properties" \
      ${scram[@]+"${scram[@]}"} \
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
  cluster) shift; . "$here/kafka_cluster.sh"; cluster "$@" ;;
  tool) shift; tool "$@" ;;
  up) up ;;
  down) down ;;
  status) status ;;
  logs) tail -n "${2:-100}" "$state/logs/server.log" ;;
  env) [ -f "$state/client.env" ] || die "no $state/client.env: run CONNTRACK_KAFKA_SECURITY=sasl_ssl infra/kafka.sh up first"
    cat "$state/client.env" ;;
  reset) down; rm -rf "$state"; echo "infra/kafka: state removed" ;;
  *) echo "usage: infra/kafka.sh up|down|status|logs|reset|env|tool NAME [ARGS...]" >&2; exit 2 ;;
esac
