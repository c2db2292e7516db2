# shellcheck shell=bash
# A local multi-broker KRaft cluster (every node a combined broker+controller), for trying and
# testing what happens when a broker or the active controller dies. Run through infra/kafka.sh:
#
#   infra/kafka.sh cluster up [N]        start N nodes (default 3; formats storage once)
#   infra/kafka.sh cluster down          stop every node (SIGTERM, then SIGKILL after 30 s)
#   infra/kafka.sh cluster status        each node's state; exit 3 unless all are running
#   infra/kafka.sh cluster kill I        SIGKILL node I (a crash: no controlled shutdown)
#   infra/kafka.sh cluster start I       start node I again and wait until it serves
#   infra/kafka.sh cluster bootstrap     the client bootstrap list, e.g. for CONNTRACK_KAFKA_BOOTSTRAP_SERVERS
#   infra/kafka.sh cluster controller    the node id of the active KRaft controller (quorum leader)
#   infra/kafka.sh cluster leader TOPIC PARTITION   the node id leading that partition
#   infra/kafka.sh cluster logs I [LINES] | reset
#
# Node i (1..N) listens for clients on 127.0.0.1:(CONNTRACK_CLUSTER_PORT + i) and for the
# controller quorum on 127.0.0.1:(CONNTRACK_CLUSTER_CTRL_PORT + i); state lives under
# $CONNTRACK_STATE_DIR/kafka-cluster/node-i.
#
# Environment:
#   CONNTRACK_CLUSTER_PORT       client port base       (default 19192: nodes on 19193..)
#   CONNTRACK_CLUSTER_CTRL_PORT  controller port base   (default 19292: nodes on 19293..)
#   CONNTRACK_CLUSTER_HEAP       JVM heap per node      (default 384m)
#   CONNTRACK_CLUSTER_JAVA_OPTS  more JVM options per node (default none)
#   CONNTRACK_CLUSTER_BROKER_PROPS  more server properties per node, `key=value` separated by
#                                spaces (e.g. broker.session.timeout.ms=3000; written when the
#                                nodes are formatted, at the first `up`)
#   CONNTRACK_STATE_DIR          as for infra/kafka.sh  (default <repo>/.local)
#
# A separate file, sourced by infra/kafka.sh, rather than more of kafka.sh: the single broker is
# what every developer and the whole test suite use, and it stays short and unchanged by this;
# the cluster reuses its functions (need_tools, resolve_artifacts, port_open, tool, die) and
# its Maven artifacts ($lib), so both run the very same Kafka.

cluster_port="${CONNTRACK_CLUSTER_PORT:-19192}"
cluster_ctrl_port="${CONNTRACK_CLUSTER_CTRL_PORT:-19292}"
cluster_heap="${CONNTRACK_CLUSTER_HEAP:-384m}"
cluster_java_opts="${CONNTRACK_CLUSTER_JAVA_OPTS:-}"
cluster_state="${CONNTRACK_STATE_DIR:-$repo/.local}/kafka-cluster"

cluster_size() {
  # The size the cluster was formatted with (its voters are fixed then), else the argument.
  if [ -f "$cluster_state/nodes" ]; then cat "$cluster_state/nodes"; else echo "${1:-3}"; fi
}

node_dir() { echo "$cluster_state/node-$1"; }

node_running() {
  local pidfile; pidfile="$(node_dir "$1")/node.pid"
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

cluster_bootstrap() {
  local n i out=""
  n="$(cluster_size)"
  for i in $(seq 1 "$n"); do out="$out${out:+,}127.0.0.1:$((cluster_port + i))"; done
  echo "$out"
}

check_node() {
  local n; n="$(cluster_size)"
  [[ "${1:-}" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "$n" ] ||
    die "cluster: node must be one of 1..$n, not '${1:-}'"
}

write_node_config() {
  local i="$1" n="$2" dir voters="" j replication min_isr
  dir="$(node_dir "$i")"
  for j in $(seq 1 "$n"); do voters="$voters${voters:+,}$j@127.0.0.1:$((cluster_ctrl_port + j))"; done
  # As producer/topics.py's default_replication: three replicas where there are three brokers,
  # two of them in sync for an acks=all write, so one node may die without losing a record.
  replication=$((n < 3 ? n : 3))
  min_isr=$((replication >= 3 ? 2 : 1))
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=$i
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$((cluster_port + i)),CONTROLLER://127.0.0.1:$((cluster_ctrl_port + i))
advertised.listeners=PLAINTEXT://127.0.0.1:$((cluster_port + i))
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
num.partitions=3
default.replication.factor=$replication
min.insync.replicas=$min_isr
offsets.topic.replication.factor=$replication
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=$replication
transaction.state.log.min.isr=$min_isr
share.coordinator.state.topic.replication.factor=$replication
share.coordinator.state.topic.min.isr=$min_isr
unclean.leader.election.enable=false
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
PROPS
  local prop
  for prop in ${CONNTRACK_CLUSTER_BROKER_PROPS:-}; do
    [[ "$prop" == *=* ]] || die "cluster: CONNTRACK_CLUSTER_BROKER_PROPS: '$prop' is not key=value"
    echo "$prop" >>"$dir/server.properties"
  done
}

node_jvm() {
  # The JVM command line of node $1, into the array `jvm`, one definition for every use.
  local dir extra=()
  dir="$(node_dir "$1")"
  read -ra extra <<<"$cluster_java_opts"
  jvm=(java -Xms128m -Xmx"$cluster_heap" -XX:+UseG1GC ${extra[@]+"${extra[@]}"}
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$here/kafka/log4j2.properties"
    -Dkafka.logs.dir="$dir/logs" -cp "$lib/*")
}

node_java() {
  local jvm
  node_jvm "$1"; shift
  "${jvm[@]}" "$@"
}

launch_node() {
  local i="$1" dir
  dir="$(node_dir "$i")"
  if node_running "$i"; then return 0; fi
  port_open $((cluster_port + i)) && die "cluster: port $((cluster_port + i)) is taken; set CONNTRACK_CLUSTER_PORT."
  port_open $((cluster_ctrl_port + i)) && die "cluster: port $((cluster_ctrl_port + i)) is taken; set CONNTRACK_CLUSTER_CTRL_PORT."
  # Readiness is judged by what this start logs: server.log is appended to across restarts.
  stat -c %s "$dir/logs/server.log" 2>/dev/null >"$dir/log.offset" || echo 0 >"$dir/log.offset"
  # setsid: the node outlives the shell that started it, and signals to that shell's group.
  local jvm
  node_jvm "$i"
  setsid nohup "${jvm[@]}" kafka.Kafka "$dir/server.properties" >>"$dir/logs/stdout.log" 2>&1 </dev/null &
  echo $! >"$dir/node.pid"
}

node_ready() {
  # grep reads to the end (no -q): under pipefail, tail killed by SIGPIPE would fail the test.
  local dir; dir="$(node_dir "$1")"
  tail -c +"$(($(cat "$dir/log.offset" 2>/dev/null || echo 0) + 1))" "$dir/logs/server.log" 2>/dev/null |
    grep "Kafka Server started" >/dev/null && port_open $((cluster_port + $1))
}

wait_nodes() {
  local i pending dir
  echo -n "infra/kafka: waiting for node(s) $* "
  for _ in $(seq 1 180); do
    pending=""
    for i in "$@"; do
      node_ready "$i" && continue
      if ! node_running "$i"; then
        dir="$(node_dir "$i")"
        echo; tail -40 "$dir/logs/stdout.log" "$dir/logs/server.log" >&2 2>/dev/null
        die "cluster: node $i exited during start-up"
      fi
      pending="$pending $i"
    done
    [ -z "$pending" ] && { echo " ready"; return 0; }
    echo -n "."; sleep 1
  done
  set -- $pending
  echo; die "cluster: node(s) $* not ready after 180 s; see $(node_dir "$1")/logs/server.log"
}

cluster_up() {
  local n="${1:-}" i dir cluster_id
  need_tools
  resolve_artifacts
  if [ -f "$cluster_state/nodes" ] && [ -n "$n" ] && [ "$n" != "$(cat "$cluster_state/nodes")" ]; then
    die "cluster: formatted with $(cat "$cluster_state/nodes") nodes; run 'infra/kafka.sh cluster reset' to start over with $n"
  fi
  n="$(cluster_size "$n")"
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 9 ] || die "cluster: size must be 1..9, not '$n'"
  mkdir -p "$cluster_state"
  if [ ! -f "$cluster_state/nodes" ]; then
    cluster_id="$(node_java 1 kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
    for i in $(seq 1 "$n"); do
      dir="$(node_dir "$i")"
      rm -rf "$dir"; mkdir -p "$dir/logs" "$dir/data"
      write_node_config "$i" "$n"
      node_java "$i" kafka.tools.StorageTool format -t "$cluster_id" -c "$dir/server.properties" \
        >"$dir/logs/format.log" 2>&1 || { cat "$dir/logs/format.log" >&2; die "cluster: formatting node $i failed"; }
    done
    echo "$n" >"$cluster_state/nodes"
  fi
  # All at once: a node's broker only finishes starting once a quorum of controllers is up.
  for i in $(seq 1 "$n"); do launch_node "$i"; done
  wait_nodes $(seq 1 "$n")
  echo "infra/kafka: cluster of $n (Kafka $version, KRaft) on $(cluster_bootstrap)"
}

stop_pids() {
  # SIGTERM (a controlled shutdown moves leadership away first), SIGKILL what is left after 30 s.
  local signal="$1"; shift
  local pid
  for pid in "$@"; do kill "-$signal" "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 60); do
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && break; pid=""; done
    [ -z "$pid" ] && return 0
    sleep 0.5
  done
  for pid in "$@"; do kill -9 "$pid" 2>/dev/null || true; done
}

cluster_down() {
  local i pids=()
  [ -f "$cluster_state/nodes" ] || { echo "infra/kafka: no cluster"; return 0; }
  for i in $(seq 1 "$(cluster_size)"); do
    node_running "$i" && pids+=("$(cat "$(node_dir "$i")/node.pid")")
  done
  [ "${#pids[@]}" -gt 0 ] && stop_pids TERM "${pids[@]}"
  rm -f "$cluster_state"/node-*/node.pid
  echo "infra/kafka: cluster stopped"
}

cluster_status() {
  local i up=0 n
  [ -f "$cluster_state/nodes" ] || { echo "infra/kafka: no cluster (state $cluster_state)"; return 3; }
  n="$(cluster_size)"
  for i in $(seq 1 "$n"); do
    if node_running "$i" && port_open $((cluster_port + i)); then
      echo "node $i: running on 127.0.0.1:$((cluster_port + i)) (pid $(cat "$(node_dir "$i")/node.pid"))"
      up=$((up + 1))
    else
      echo "node $i: not running (port $((cluster_port + i)))"
    fi
  done
  echo "infra/kafka: $up of $n nodes running (Kafka $version, state $cluster_state)"
  [ "$up" -eq "$n" ] || return 3
}

cluster_kill() {
  check_node "${1:-}"
  node_running "$1" || die "cluster: node $1 is not running"
  local pid; pid="$(cat "$(node_dir "$1")/node.pid")"
  kill -9 "$pid"
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  rm -f "$(node_dir "$1")/node.pid"
  echo "infra/kafka: node $1 killed (SIGKILL, pid $pid)"
}

cluster_start() {
  check_node "${1:-}"
  need_tools
  resolve_artifacts
  if node_running "$1"; then echo "infra/kafka: node $1 already running"; return 0; fi
  launch_node "$1"
  wait_nodes "$1"
}

live_bootstrap() {
  local i out=""
  for i in $(seq 1 "$(cluster_size)"); do
    node_running "$i" && out="$out${out:+,}127.0.0.1:$((cluster_port + i))"
  done
  [ -n "$out" ] || die "cluster: no node is running"
  echo "$out"
}

cluster_controller() {
  local bs; bs="$(live_bootstrap)"
  (tool kafka-metadata-quorum --bootstrap-server "$bs" describe --status) |
    sed -n 's/^LeaderId:[[:space:]]*\([0-9]*\).*/\1/p' | grep . ||
    die "cluster: no active controller reported"
}

cluster_leader() {
  local topic="${1:-}" partition="${2:-}" bs
  [ -n "$topic" ] && [[ "$partition" =~ ^[0-9]+$ ]] || die "cluster: usage: cluster leader TOPIC PARTITION"
  bs="$(live_bootstrap)"
  (tool kafka-topics --bootstrap-server "$bs" --describe --topic "$topic") |
    awk -v p="$partition" '{ for (k = 1; k < NF; k++) if ($k == "Partition:" && $(k + 1) == p)
      for (m = k; m < NF; m++) if ($m == "Leader:") { print $(m + 1); found = 1; exit } }
      END { exit !found }' || die "cluster: no leader found for $topic partition $partition"
}

cluster() {
  local command="${1:-}"; shift || true
  case "$command" in
    up) cluster_up "$@" ;;
    down) cluster_down ;;
    status) cluster_status ;;
    kill) cluster_kill "$@" ;;
    start) cluster_start "$@" ;;
    bootstrap) cluster_bootstrap ;;
    controller) cluster_controller ;;
    leader) cluster_leader "$@" ;;
    logs) check_node "${1:-}"; tail -n "${2:-100}" "$(node_dir "$1")/logs/server.log" ;;
    reset) cluster_down; rm -rf "$cluster_state"; echo "infra/kafka: cluster state removed" ;;
    *) echo "usage: infra/kafka.sh cluster up [N]|down|status|kill I|start I|bootstrap|controller|leader TOPIC PARTITION|logs I [LINES]|reset" >&2
       exit 2 ;;
  esac
}
