#!/usr/bin/env bash
# A throwaway PostgreSQL server from Debian's packages, for tests, benchmarks and local runs.
#
#   infra/postgres.sh up | down | crash | status | url | reset
#   infra/postgres.sh replica up | down | crash | status | url | reset
#
# `crash` stops the server as a crash would (pg_ctl stop -m immediate), for failover tests.
#
# Environment:
#   CONNTRACK_PG_PORT   TCP port on 127.0.0.1                    (default 55432)
#   CONNTRACK_PG_DIR    data directory (must be reachable by the  (default /tmp/conntrack-pg-<port>)
#                       'postgres' OS user, hence not inside a checkout that may live under /root)
#   CONNTRACK_PG_REPLICA_PORT  the replica's port                 (default: CONNTRACK_PG_PORT + 1)
#   CONNTRACK_PG_REPLICA_DIR   the replica's directory            (default /tmp/conntrack-pg-<its port>)
#   CONNTRACK_PG_TLS_DIR       a folder with server.crt and server.key: the server also takes TLS
#                       connections with them (ssl = on; plain ones still work), for tests of
#                       sslmode and certificate verification.
#   CONNTRACK_PG_DURABLE=1     a server that commits like a production one: synchronous_commit = on
#                       (PostgreSQL's default; fsync and full_page_writes are left on as ever).
#                       Without it the server runs with synchronous_commit = off (a crash may lose
#                       the last commits, never corrupt data). Set either way (1 or 0), it is also
#                       enforced at each start of an existing data directory.
#
# The server trusts loopback connections: it is for tests on this machine, never for production.
# It creates role and database 'conntrack'; `infra/postgres.sh url` prints the SQLAlchemy URL.
#
# `replica up` makes a hot-standby streaming replica of the running primary (pg_basebackup -R,
# the same binaries), read-only, on its own port and data directory; `replica url` prints its
# URL (CONNTRACK_API_READ_DATABASE_URLS). Every primary this script creates is configured for it
# (wal_level = replica, max_wal_senders, a replication line in pg_hba.conf for loopback; the
# first two are also PostgreSQL's defaults, so primaries made before this change qualify too).
set -euo pipefail

port="${CONNTRACK_PG_PORT:-55432}"
dir="${CONNTRACK_PG_DIR:-/tmp/conntrack-pg-$port}"
data="$dir/data"
replica_port="${CONNTRACK_PG_REPLICA_PORT:-$((port + 1))}"
replica_dir="${CONNTRACK_PG_REPLICA_DIR:-/tmp/conntrack-pg-$replica_port}"
replica_data="$replica_dir/data"

die() { echo "infra/postgres: $*" >&2; exit 1; }

case "${CONNTRACK_PG_DURABLE:-}" in
  1) synchronous_commit=on; start_options=(-o "-c synchronous_commit=on") ;;
  0) synchronous_commit=off; start_options=(-o "-c synchronous_commit=off") ;;
  "") synchronous_commit=off; start_options=() ;;
  *) die "CONNTRACK_PG_DURABLE must be 1 or 0, not '$CONNTRACK_PG_DURABLE'" ;;
esac

pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && echo "$d"; done | sort -V | tail -1
}

ensure_installed() {
  [ -n "$(pg_bin)" ] && return 0
  command -v apt-get >/dev/null 2>&1 ||
    die "PostgreSQL server binaries not found and apt-get is unavailable; install PostgreSQL 13+."
  [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed; run as root or: sudo apt-get install postgresql"
  echo "infra/postgres: installing PostgreSQL from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; } ||
    die "apt-get install postgresql failed"
  [ -n "$(pg_bin)" ] || die "postgresql installed but initdb not found under /usr/lib/postgresql"
}

# PostgreSQL refuses to run as root: run it as the 'postgres' OS user when we are root.
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

running() { [ -n "$(pg_bin)" ] && [ -f "$data/postmaster.pid" ] && as_pg "$(pg_bin)/pg_ctl" -D "$data" status >/dev/null 2>&1; }

url() { echo "postgresql+asyncpg://conntrack@127.0.0.1:$port/conntrack"; }

up() {
  ensure_installed
  local bin; bin="$(pg_bin)"
  if running; then echo "infra/postgres: already running on 127.0.0.1:$port"; return 0; fi
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && die "port $port is taken; set CONNTRACK_PG_PORT."
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && { id postgres >/dev/null 2>&1 || as_pg true; chown postgres: "$dir"; }
  if [ ! -f "$data/PG_VERSION" ]; then
    as_pg "$bin/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 ||
      { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    cat >>"$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 200
shared_buffers = 256MB
# off: a throwaway server, where a crash may lose the last commits, never corrupt data;
# on with CONNTRACK_PG_DURABLE=1 (benchmarks on production-like durability).
synchronous_commit = $synchronous_commit
# Streaming replicas (`infra/postgres.sh replica up`); WAL kept so a paused replica catches up.
wal_level = replica
max_wal_senders = 10
wal_keep_size = 512MB
CONF
    # initdb --auth=trust already trusts loopback replication; stated so it does not depend on it.
    echo "host replication all 127.0.0.1/32 trust" >>"$data/pg_hba.conf"
  fi
  if [ -n "${CONNTRACK_PG_TLS_DIR:-}" ]; then
    local f
    for f in server.crt server.key; do
      [ -f "$CONNTRACK_PG_TLS_DIR/$f" ] || die "CONNTRACK_PG_TLS_DIR has no $f"
      install -m 600 "$CONNTRACK_PG_TLS_DIR/$f" "$data/$f"
      [ "$(id -u)" = 0 ] && chown postgres: "$data/$f"
    done
    start_options+=(-o "-c ssl=on")
  fi
  as_pg "$bin/pg_ctl" -D "$data" -l "$dir/server.log" ${start_options[@]+"${start_options[@]}"} -w -t 60 start >/dev/null ||
    { tail -30 "$dir/server.log" >&2; die "server did not start"; }
  as_pg "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -q -v ON_ERROR_STOP=1 >/dev/null <<SQL
SELECT 'CREATE ROLE conntrack LOGIN SUPERUSER' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'conntrack')\gexec
SELECT 'CREATE DATABASE conntrack OWNER conntrack' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'conntrack')\gexec
SQL
  echo "infra/postgres: ready on 127.0.0.1:$port ($(url))"
}

down() {
  if ! running; then echo "infra/postgres: not running"; return 0; fi
  as_pg "$(pg_bin)/pg_ctl" -D "$data" -m fast -w stop >/dev/null
  echo "infra/postgres: stopped"
}

status() {
  if running; then echo "infra/postgres: running on 127.0.0.1:$port (data $data)"; else echo "infra/postgres: not running (port $port)"; return 3; fi
}

replica_running() {
  [ -n "$(pg_bin)" ] && [ -f "$replica_data/postmaster.pid" ] &&
    as_pg "$(pg_bin)/pg_ctl" -D "$replica_data" status >/dev/null 2>&1
}

replica_url() { echo "postgresql+asyncpg://conntrack@127.0.0.1:$replica_port/conntrack"; }

replica_up() {
  ensure_installed
  local bin; bin="$(pg_bin)"
  if replica_running; then echo "infra/postgres: replica already running on 127.0.0.1:$replica_port"; return 0; fi
  (exec 3<>"/dev/tcp/127.0.0.1/$replica_port") 2>/dev/null &&
    die "port $replica_port is taken; set CONNTRACK_PG_REPLICA_PORT."
  mkdir -p "$replica_dir"
  [ "$(id -u)" = 0 ] && { id postgres >/dev/null 2>&1 || as_pg true; chown postgres: "$replica_dir"; }
  if [ ! -f "$replica_data/PG_VERSION" ]; then
    running || die "the primary on 127.0.0.1:$port is not running (infra/postgres.sh up)"
    # -R writes standby.signal and primary_conninfo; -X stream copies the WAL made meanwhile.
    as_pg "$bin/pg_basebackup" -h 127.0.0.1 -p "$port" -U postgres -D "$replica_data" -R -X stream \
      -c fast >"$replica_dir/basebackup.log" 2>&1 ||
      { cat "$replica_dir/basebackup.log" >&2; rm -rf "$replica_data"; die "pg_basebackup failed"; }
    # The copied postgresql.conf is the primary's: the last setting wins, so these override it.
    cat >>"$replica_data/postgresql.conf" <<CONF
# The streaming replica of 127.0.0.1:$port
port = $replica_port
unix_socket_directories = '$replica_dir'
hot_standby = on
hot_standby_feedback = on
CONF
  fi
  as_pg "$bin/pg_ctl" -D "$replica_data" -l "$replica_dir/server.log" -w -t 60 start >/dev/null ||
    { tail -30 "$replica_dir/server.log" >&2; die "replica did not start"; }
  echo "infra/postgres: replica of 127.0.0.1:$port ready on 127.0.0.1:$replica_port ($(replica_url))"
}

replica_down() {
  if ! replica_running; then echo "infra/postgres: replica not running"; return 0; fi
  as_pg "$(pg_bin)/pg_ctl" -D "$replica_data" -m fast -w stop >/dev/null
  echo "infra/postgres: replica stopped"
}

replica_status() {
  if replica_running; then
    echo "infra/postgres: replica running on 127.0.0.1:$replica_port (data $replica_data)"
  else
    echo "infra/postgres: replica not running (port $replica_port)"; return 3
  fi
}

# As a crash would: no shutdown checkpoint, clients cut off (for failover tests).
crash() {
  local d="$1"
  [ -f "$d/postmaster.pid" ] && as_pg "$(pg_bin)/pg_ctl" -D "$d" -m immediate -w stop >/dev/null
  echo "infra/postgres: stopped (immediate)"
}

replica() {
  case "${1:-}" in
    up) replica_up ;;
    down) replica_down ;;
    crash) crash "$replica_data" ;;
    status) replica_status ;;
    url) replica_url ;;
    reset) replica_down; rm -rf "$replica_dir"; echo "infra/postgres: replica data removed" ;;
    *) echo "usage: infra/postgres.sh replica up|down|crash|status|url|reset" >&2; exit 2 ;;
  esac
}

case "${1:-}" in
  replica) replica "${2:-}" ;;
  up) up ;;
  down) down ;;
  crash) crash "$data" ;;
  status) status ;;
  url) url ;;
  reset) down; rm -rf "$dir"; echo "infra/postgres: data removed" ;;
  *) echo "usage: infra/postgres.sh up|down|crash|status|url|reset | replica up|down|crash|status|url|reset" >&2; exit 2 ;;
esac
