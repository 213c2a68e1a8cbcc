#!/usr/bin/env bash
# PostgreSQL for the replica tests: Debian's `postgresql` package (installed with apt when
# missing), the cluster started with pg_ctlcluster (no systemd needed), a role and a database
# for the tests. Idempotent: run it as often as you like. Prints the DATABASE_URL on stdout
# (everything else goes to stderr), so `export HOT_POTATO_TEST_DATABASE="$(scripts/ensure-postgres.sh)"`.
#
# The role may create databases: each test makes its own (`hp_<random>`) and drops it.
# Overrides: PG_USER, PG_PASSWORD, PG_DB, PG_PORT (default 5432).
set -euo pipefail

PG_USER="${PG_USER:-hotpotato}"
PG_PASSWORD="${PG_PASSWORD:-hotpotato}"
PG_DB="${PG_DB:-hotpotato_test}"
PG_PORT="${PG_PORT:-5432}"

log() { printf 'ensure-postgres: %s\n' "$*" >&2; }

if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    log "installing postgresql with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends postgresql >&2 || {
        apt-get update >&2
        apt-get install -y --no-install-recommends postgresql >&2
    }
fi

# The newest installed major version, and its cluster (created by the package as `main`).
VERSION="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
CLUSTER="${PG_CLUSTER:-main}"
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$VERSION $CLUSTER"; then
    log "creating cluster $VERSION $CLUSTER"
    pg_createcluster "$VERSION" "$CLUSTER" -p "$PG_PORT" >&2
fi

status="$(pg_lsclusters -h | awk -v v="$VERSION" -v c="$CLUSTER" '$1==v && $2==c {print $4}')"
if [[ "$status" != online* ]]; then
    log "starting cluster $VERSION $CLUSTER"
    pg_ctlcluster "$VERSION" "$CLUSTER" start >&2
fi
PORT="$(pg_lsclusters -h | awk -v v="$VERSION" -v c="$CLUSTER" '$1==v && $2==c {print $3}')"

as_postgres() {
    if [[ "$(id -un)" == postgres ]]; then
        "$@"
    else
        runuser -u postgres -- "$@"
    fi
}
psql_admin() { as_postgres psql -p "$PORT" -v ON_ERROR_STOP=1 -qtAX "$@"; }

for _ in $(seq 1 60); do
    if as_postgres pg_isready -q -p "$PORT"; then
        break
    fi
    sleep 0.5
done
as_postgres pg_isready -q -p "$PORT" || {
    log "PostgreSQL $VERSION $CLUSTER did not become ready on port $PORT"
    exit 1
}

if [[ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'")" != 1 ]]; then
    log "creating role $PG_USER"
    psql_admin -c "CREATE ROLE \"$PG_USER\" LOGIN CREATEDB PASSWORD '$PG_PASSWORD'"
fi
if [[ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]]; then
    log "creating database $PG_DB"
    psql_admin -c "CREATE DATABASE \"$PG_DB\" OWNER \"$PG_USER\""
fi

printf 'postgres://%s:%s@127.0.0.1:%s/%s\n' "$PG_USER" "$PG_PASSWORD" "$PORT" "$PG_DB"
