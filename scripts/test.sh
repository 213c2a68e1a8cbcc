#!/usr/bin/env bash
# The whole test suite: a local PostgreSQL (replica tests), a local RabbitMQ 3.10 with the AMQP 1.0 and management plugins, and
# RabbitMQ 4.0 from Debian trixie in its own root beside it (both installed and started when
# missing), then formatting, lints, every test target against 3.10, and the broker matrix: the
# tests whose result depends on broker semantics again against 4.0.
# HOT_POTATO_SKIP_RABBITMQ4=1 skips RabbitMQ 4.0 and the matrix (see README, Tests).
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

step "build tools (cc, make)"
"$ROOT/scripts/ensure-build-tools.sh"

step "broker (amqp://localhost:5672)"
AMQP_URL=amqp://localhost:5672 "$ROOT/scripts/ensure-broker.sh"

if [[ "${HOT_POTATO_SKIP_RABBITMQ4:-0}" == 1 ]]; then
    step "RabbitMQ 4.0 skipped (HOT_POTATO_SKIP_RABBITMQ4=1): the broker matrix runs on 3.10 only"
else
    step "RabbitMQ 4.0 (amqp://localhost:5673)"
    "$ROOT/scripts/rabbitmq4.sh" ensure
fi

# The replica tests (tests/replicas.rs) make a database each on a local PostgreSQL (Debian's
# package, installed and started when missing).
step "PostgreSQL (replica tests)"
HOT_POTATO_TEST_DATABASE="$("$ROOT/scripts/ensure-postgres.sh")"
export HOT_POTATO_TEST_DATABASE

# The dashboard test (tests/dashboard.rs) drives a headless Chromium through chromedriver.
if [[ ! -x /usr/bin/chromedriver ]]; then
    step "installing chromium and chromium-driver (for the dashboard test)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends chromium chromium-driver
fi

# The compose test (tests/compose.rs) validates docker-compose.yml against the Compose
# specification's JSON schema, which Debian's docker-compose package ships: the package is
# downloaded and unpacked into target/, not installed.
COMPOSE_SCHEMA="$ROOT/target/compose-spec/compose_spec.json"
if [[ ! -f "$COMPOSE_SCHEMA" ]]; then
    step "fetching the Compose schema from Debian's docker-compose package (not installed)"
    work="$(mktemp -d)"
    chmod 755 "$work"
    (cd "$work" && { apt-get download docker-compose 2>/dev/null || { apt-get update && apt-get download docker-compose; }; })
    dpkg-deb -x "$work"/docker-compose_*.deb "$work/root"
    mkdir -p "$(dirname "$COMPOSE_SCHEMA")"
    cp "$work/root/usr/lib/python3/dist-packages/compose/config/compose_spec.json" "$COMPOSE_SCHEMA"
    rm -rf "$work"
fi
export HOT_POTATO_COMPOSE_SCHEMA="$COMPOSE_SCHEMA"

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
export HOT_POTATO_TEST_BROKER_KIND=rabbitmq3

step "cargo test --workspace --all-targets -- --test-threads=2 (RabbitMQ 3.10)"
cargo test --workspace --all-targets -- --test-threads=2

# The broker matrix: what depends on broker semantics (delivery and order, the failure outcome
# and what the broker does with it, dead letters, poison vs outage, kill -9, broker restart,
# pause/resume, the counted fault tests) once more against RabbitMQ 4.0, with its expectations.
MATRIX_BINARIES=(dispatch reliability dead_letters broker_restart process request_reply batch)
MATRIX_FILTERED=(faults operate policy)
MATRIX_FILTERS=(kill_9 flapping a_pool_slot pause_keeps json_logs a_ten_second_outage retries_use reject_on)
if [[ "${HOT_POTATO_SKIP_RABBITMQ4:-0}" != 1 ]]; then
    step "broker matrix: RabbitMQ 4.0 (${MATRIX_BINARIES[*]}; ${MATRIX_FILTERED[*]}: ${MATRIX_FILTERS[*]})"
    export HOT_POTATO_TEST_BROKER=amqp://guest:guest@127.0.0.1:5673
    export HOT_POTATO_TEST_MANAGEMENT=http://127.0.0.1:15673
    export HOT_POTATO_TEST_BROKER_KIND=rabbitmq4
    export HOT_POTATO_TEST_RABBITMQCTL="$ROOT/scripts/rabbitmq4.sh ctl"
    cargo test $(printf -- '--test %s ' "${MATRIX_BINARIES[@]}") -- --test-threads=2
    cargo test $(printf -- '--test %s ' "${MATRIX_FILTERED[@]}") -- --test-threads=2 "${MATRIX_FILTERS[@]}"
    step "broker matrix passed"
    printf '  %-16s %-14s %s\n' "tests" "RabbitMQ 3.10" "RabbitMQ 4.0"
    for binary in "${MATRIX_BINARIES[@]}"; do
        printf '  %-16s %-14s %s\n' "$binary" passed passed
    done
    for binary in "${MATRIX_FILTERED[@]}"; do
        printf '  %-16s %-14s %s\n' "$binary" passed "passed (${MATRIX_FILTERS[*]})"
    done
fi

step "all checks passed"
