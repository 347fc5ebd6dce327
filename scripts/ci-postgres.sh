#!/usr/bin/env bash
# A throwaway PostgreSQL server for the job-store tests.
#
#   export FARM_TEST_POSTGRES_URL=$(scripts/ci-postgres.sh /tmp/pg)   # start (or find) it, print its URL
#   scripts/ci-postgres.sh stop /tmp/pg                               # stop it
#
# DIR holds the cluster (DIR/data), its socket and log (DIR/postgres.log). Only the URL
# goes to stdout; everything else to stderr. Installs Debian's postgresql when no
# server binaries are found. Runs as root (initdb/postgres then run as the `postgres`
# user, so DIR must be reachable by it) or as an ordinary user. Listens on 127.0.0.1
# only, port $FARM_PG_PORT (default 55432). Durability is switched off (fsync,
# synchronous_commit): this cluster is for tests, never for data.
set -euo pipefail

PORT="${FARM_PG_PORT:-55432}"
DB_NAME=videofarm_test
DB_USER=videofarm
DB_PASSWORD=videofarm

usage() { echo "usage: $0 DIR | $0 stop DIR" >&2; exit 2; }

action=start
if [[ "${1:-}" == "stop" ]]; then action=stop; shift; fi
[[ $# -eq 1 && -n "$1" ]] || usage
mkdir -p "$1"
DIR="$(cd "$1" && pwd)"
DATA="$DIR/data"
exec 3>&1 1>&2  # keep stdout for the URL alone

find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
BIN="$(find_bin)"

as_pg() {
  # initdb and postgres refuse to run as root.
  if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

running() { [[ -n "$BIN" && -f "$DATA/PG_VERSION" ]] && as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

if [[ "$action" == stop ]]; then
  if running; then as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w stop; else echo "no server running in $DATA"; fi
  exit 0
fi

if [[ -z "$BIN" ]]; then
  [[ "$(id -u)" == 0 ]] || { echo "PostgreSQL is not installed; run as root or: apt-get install -y postgresql"; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
  BIN="$(find_bin)"
  [[ -n "$BIN" ]] || { echo "postgresql installed but no /usr/lib/postgresql/*/bin found"; exit 1; }
fi

if [[ "$(id -u)" == 0 ]]; then
  chown postgres: "$DIR"
  runuser -u postgres -- test -w "$DIR" || { echo "$DIR is not writable by the postgres user (is a parent folder private?)"; exit 1; }
fi

if [[ ! -f "$DATA/PG_VERSION" ]]; then
  as_pg "$BIN/initdb" -D "$DATA" -U postgres -E UTF8 --auth-local=trust --auth-host=scram-sha-256 >/dev/null
fi

if running; then
  PORT="$(sed -n 4p "$DATA/postmaster.pid")"  # the port it was started with
else
  opts="-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  # 3>&-: the server must not inherit the stdout pipe, or $(this script) never sees EOF.
  as_pg "$BIN/pg_ctl" -D "$DATA" -l "$DIR/postgres.log" -o "$opts" -w -t 60 start >/dev/null 3>&- || {
    echo "PostgreSQL did not start (port $PORT taken? set FARM_PG_PORT); log follows:"; tail -n 20 "$DIR/postgres.log"; exit 1; }
fi

for _ in $(seq 1 60); do
  as_pg "$BIN/pg_isready" -q -h "$DIR" -p "$PORT" && break
  sleep 0.5
done
as_pg "$BIN/pg_isready" -q -h "$DIR" -p "$PORT" || { echo "PostgreSQL on port $PORT is not ready"; exit 1; }

psql_admin() { as_pg "$BIN/psql" -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [[ -z "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'")" ]]; then
  psql_admin -c "CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASSWORD'"
fi
if [[ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" ]]; then
  psql_admin -c "CREATE DATABASE $DB_NAME OWNER $DB_USER"
fi

echo "postgresql+psycopg://$DB_USER:$DB_PASSWORD@127.0.0.1:$PORT/$DB_NAME" >&3
