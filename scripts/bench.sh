#!/usr/bin/env bash
# The dispatch benchmark (benches/dispatch/, one file per scenario) against the local RabbitMQ:
# makes sure the broker answers (installing and starting it when missing, see ensure-broker.sh),
# builds the release daemon the benchmark runs as a child process, then runs
# `cargo bench --bench dispatch`.
#
# Settings come from the environment and are passed through, for example:
#   BENCH_MESSAGES=5000 BENCH_LATENCY_SECS=5 BENCH_SCALE_ENROLLMENTS=50 scripts/bench.sh
#   BENCH_SCALE=0 scripts/bench.sh          # without the 1,000-enrollment scenario
#   BENCH_SCALE_POOL=8 scripts/bench.sh     # its daemon with AMQP_CONNECTION_POOL=8
# Arguments are passed to the benchmark binary (`--no-scale` skips the scale scenario).
# See the header of benches/dispatch/main.rs for every variable. The daemon binary is looked for
# under CARGO_TARGET_DIR when that is set (HOT_POTATO_BIN names another).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! command -v cargo >/dev/null 2>&1 && [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || {
    echo "bench.sh: cargo is not on PATH; install Rust with rustup first" >&2
    exit 1
}

printf '==> broker\n'
AMQP_URL="${BENCH_AMQP_URL:-amqp://localhost:5672}" "$ROOT/scripts/ensure-broker.sh"

printf '\n==> cargo build --release --bin hot-potato\n'
cargo build --release --bin hot-potato

# Ticks per second of /proc/PID/stat, for the CPU figures.
BENCH_CLK_TCK="${BENCH_CLK_TCK:-$(getconf CLK_TCK 2>/dev/null || echo 100)}"
export BENCH_CLK_TCK

printf '\n==> cargo bench --bench dispatch\n'
exec cargo bench --bench dispatch -- "$@"
