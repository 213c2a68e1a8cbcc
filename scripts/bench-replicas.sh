#!/usr/bin/env bash
# The replica benchmark (benches/replicas.rs): PostgreSQL (scripts/ensure-postgres.sh) and the
# local RabbitMQ (scripts/ensure-broker.sh), a release build of the daemon, then
# `cargo bench --bench replicas`: failover time and duplicates over BENCH_FAILOVER_RUNS kill -9
# runs (LEASE_TTL_MS = BENCH_LEASE_TTL_MS, default 10000), and the CPU cost of the snapshots at
# BENCH_SNAPSHOT_ENROLLMENTS (1000) enrollments. See the header of benches/replicas.rs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

printf '==> PostgreSQL\n'
HOT_POTATO_TEST_DATABASE="$("$ROOT/scripts/ensure-postgres.sh")"
export HOT_POTATO_TEST_DATABASE

printf '\n==> broker\n'
AMQP_URL="${BENCH_AMQP_URL:-amqp://localhost:5672}" "$ROOT/scripts/ensure-broker.sh"

printf '\n==> cargo build --release --bin hot-potato\n'
cargo build --release --bin hot-potato

BENCH_CLK_TCK="${BENCH_CLK_TCK:-$(getconf CLK_TCK 2>/dev/null || echo 100)}"
export BENCH_CLK_TCK

printf '\n==> cargo bench --bench replicas\n'
exec cargo bench --bench replicas -- "$@"
