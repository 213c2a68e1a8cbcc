#!/usr/bin/env bash
# Runs hot-potato, ready to move messages: makes sure a broker answers at AMQP_URL (installing
# and starting a local RabbitMQ with the AMQP 1.0 plugin when none does), then builds and starts
# the daemon. Arguments are passed on, e.g. `scripts/run.sh demo-receiver --port 8089`.
# Configuration comes from the environment or .env in the repository root (see .env.example).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

"$ROOT/scripts/ensure-broker.sh"

if ! command -v cargo >/dev/null 2>&1 && [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    cat >&2 <<'MSG'
run.sh: cargo is not on PATH. Install Rust with rustup:

    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
    . "$HOME/.cargo/env"

then run this script again.
MSG
    exit 1
fi

"$ROOT/scripts/ensure-build-tools.sh"

exec cargo run --release --bin hot-potato -- "$@"
