#!/usr/bin/env bash
# The whole test suite: a local RabbitMQ with the AMQP 1.0 and management plugins (installed
# and started when missing), then formatting, lints, and every test target.
# Exits non-zero as soon as one step fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# rabbitmqctl (used by the broker-restart test) lives in /usr/sbin on Debian.
export PATH="${PATH}:/usr/sbin:/sbin"

step() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1 && [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    cat >&2 <<'MSG'
test.sh: cargo is not on PATH. Install Rust with rustup:

    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
    . "$HOME/.cargo/env"
MSG
    exit 1
fi

step "broker (amqp://localhost:5672)"
AMQP_URL=amqp://localhost:5672 "$ROOT/scripts/ensure-broker.sh"

# The dashboard test (tests/dashboard.rs) drives a headless Chromium through chromedriver.
if [[ ! -x /usr/bin/chromedriver ]]; then
    step "installing chromium and chromium-driver (for the dashboard test)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends chromium chromium-driver
fi

if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    step "installing the rustfmt and clippy components"
    command -v rustup >/dev/null 2>&1 || {
        echo "test.sh: cargo fmt or cargo clippy is missing and rustup is not available to add them" >&2
        exit 1
    }
    rustup component add rustfmt clippy
fi

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# The tests talk to the broker above and declare their own queues through its management API.
export HOT_POTATO_TEST_BROKER=amqp://guest:guest@127.0.0.1:5672
export HOT_POTATO_TEST_MANAGEMENT=http://127.0.0.1:15672

step "cargo test --workspace --all-targets -- --test-threads=2"
cargo test --workspace --all-targets -- --test-threads=2

step "all checks passed"
