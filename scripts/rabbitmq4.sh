#!/usr/bin/env bash
# RabbitMQ 4.0 (Debian trixie's rabbitmq-server) beside the host's RabbitMQ 3.10, for the test
# suite's broker matrix, without changing the host's packages or apt sources.
#
#   scripts/rabbitmq4.sh ensure      build the root if missing, start the node, wait until ready
#   scripts/rabbitmq4.sh stop        stop the node, its epmd, and unmount /proc
#   scripts/rabbitmq4.sh ctl ARGS    rabbitmqctl ARGS against the node (e.g. `ctl stop_app`)
#
# The node lives in a trixie root built by debootstrap at RABBITMQ4_ROOT (default
# /var/lib/hot-potato/rabbitmq4-root) and runs in the host's network namespace:
# AMQP on 5673, management on 15673, Erlang distribution on 25673, its own epmd on 4370 (so it
# never touches the host node's epmd on 4369). Facts and pitfalls: ../shared/reference/brokers.md.
#
# Idempotent. Building the root takes about 40 s and 300 MB; it is built in a temporary
# directory and renamed only when complete, so an interrupted build is never taken for a good
# one. Needs root to build and to start.
set -euo pipefail

export PATH="${PATH}:/usr/local/sbin:/usr/sbin:/sbin"

ROOT="${RABBITMQ4_ROOT:-/var/lib/hot-potato/rabbitmq4-root}"
AMQP_PORT=5673
MANAGEMENT_PORT=15673
EPMD_PORT=4370
NODE=rabbit4@localhost
# The chroot's rabbitmq user gets uid 101 from debootstrap, which is the host's postgres on
# these machines: a process of the node would then own the host's PostgreSQL files. Renumbered.
RABBIT_UID=47001
WAIT_SECONDS=120

log() { printf 'rabbitmq4: %s\n' "$*"; }
die() {
    printf 'rabbitmq4: error: %s\n' "$*" >&2
    exit 1
}

tcp_open() {
    # shellcheck disable=SC2016 # $1 and $2 expand in the inner shell, on purpose
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

management_ok() {
    curl -sf --max-time 5 -u guest:guest "http://127.0.0.1:${MANAGEMENT_PORT}/api/overview" >/dev/null 2>&1
}

ready() { tcp_open 127.0.0.1 "$AMQP_PORT" && management_ok; }

# The first Debian mirror the host's apt uses (deb822 or one-line format), else deb.debian.org.
host_mirror() {
    local uri=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri="$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources | grep -v security | awk '{print $2}' | head -n 1 || true)"
    fi
    if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
        uri="$(grep -E '^deb ' /etc/apt/sources.list | grep -v security | awk '{print $2}' | head -n 1 || true)"
    fi
    printf '%s' "${uri:-http://deb.debian.org/debian}"
}

build_root() {
    [[ "$(id -u)" -eq 0 ]] || die "building $ROOT needs root"
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap (the only host package this script adds)"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap
    fi
    local tmp="${ROOT}.building" mirror
    mirror="$(host_mirror)"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$ROOT")"
    log "building a Debian trixie root with rabbitmq-server in $tmp from $mirror (about 40 s)"
    debootstrap --variant=minbase --include=rabbitmq-server trixie "$tmp" "$mirror" >"${tmp}.log" 2>&1 ||
        die "debootstrap failed; see ${tmp}.log"

    # Renumber the rabbitmq user and group, and give it back its files.
    local old_uid old_gid
    old_uid="$(awk -F: '$1 == "rabbitmq" {print $3}' "$tmp/etc/passwd")"
    old_gid="$(awk -F: '$1 == "rabbitmq" {print $4}' "$tmp/etc/passwd")"
    [[ -n "$old_uid" && -n "$old_gid" ]] || die "no rabbitmq user in the new root"
    sed -i -E "s/^rabbitmq:([^:]*):${old_uid}:${old_gid}:/rabbitmq:\\1:${RABBIT_UID}:${RABBIT_UID}:/" "$tmp/etc/passwd"
    sed -i -E "s/^rabbitmq:([^:]*):${old_gid}:/rabbitmq:\\1:${RABBIT_UID}:/" "$tmp/etc/group"
    find "$tmp" -xdev \( -uid "$old_uid" -o -gid "$old_gid" \) -exec chown -h "${RABBIT_UID}:${RABBIT_UID}" {} +

    cat >"$tmp/etc/rabbitmq/rabbitmq-env.conf" <<EOF
NODENAME=${NODE}
NODE_PORT=${AMQP_PORT}
DIST_PORT=25673
export ERL_EPMD_PORT=${EPMD_PORT}
EOF
    cat >"$tmp/etc/rabbitmq/rabbitmq.conf" <<EOF
listeners.tcp.default = ${AMQP_PORT}
management.tcp.port = ${MANAGEMENT_PORT}
loopback_users = none
EOF
    chroot "$tmp" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq \
        /usr/sbin/rabbitmq-plugins enable --offline rabbitmq_management >/dev/null
    chown -R "${RABBIT_UID}:${RABBIT_UID}" "$tmp/var/lib/rabbitmq" "$tmp/var/log/rabbitmq" "$tmp/etc/rabbitmq"
    chroot "$tmp" apt-get clean
    rm -f "${tmp}.log"
    mv "$tmp" "$ROOT"
    log "root ready at $ROOT"
}

mount_proc() {
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
}

start_node() {
    [[ "$(id -u)" -eq 0 ]] || die "starting the RabbitMQ 4 node needs root"
    mount_proc
    log "starting $NODE on ports $AMQP_PORT/$MANAGEMENT_PORT"
    ulimit -n 16384 2>/dev/null || true
    # Started as the rabbitmq user directly: Debian's wrapper would switch user with `su`.
    setsid chroot --userspec="${RABBIT_UID}:${RABBIT_UID}" "$ROOT" /usr/bin/env -i \
        HOME=/var/lib/rabbitmq PATH=/usr/sbin:/usr/bin:/sbin:/bin /usr/lib/rabbitmq/bin/rabbitmq-server \
        >>"$ROOT/var/log/rabbitmq/hot-potato-start.log" 2>&1 </dev/null &
    disown || true
}

wait_ready() {
    local deadline=$((SECONDS + WAIT_SECONDS))
    while ((SECONDS < deadline)); do
        if ready; then
            log "RabbitMQ 4 is ready: amqp://127.0.0.1:${AMQP_PORT}, http://127.0.0.1:${MANAGEMENT_PORT}"
            return 0
        fi
        sleep 1
    done
    die "RabbitMQ 4 did not become ready within ${WAIT_SECONDS}s; see $ROOT/var/log/rabbitmq/"
}

ctl() {
    [[ -d "$ROOT" ]] || die "no RabbitMQ 4 root at $ROOT; run '$0 ensure' first"
    chroot --userspec="${RABBIT_UID}:${RABBIT_UID}" "$ROOT" /usr/bin/env -i HOME=/var/lib/rabbitmq \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin ERL_EPMD_PORT="$EPMD_PORT" \
        /usr/lib/rabbitmq/bin/rabbitmqctl -n "$NODE" "$@"
}

ensure() {
    if ready; then
        log "already running on $AMQP_PORT/$MANAGEMENT_PORT"
        return 0
    fi
    command -v curl >/dev/null 2>&1 || die "curl is needed to reach the management API"
    [[ -x "$ROOT/usr/lib/rabbitmq/bin/rabbitmq-server" ]] || build_root
    if ! tcp_open 127.0.0.1 "$AMQP_PORT"; then
        if ctl ping >/dev/null 2>&1; then
            log "the node runs but its port is closed; starting its application"
            ctl start_app >/dev/null
        else
            start_node
        fi
    fi
    wait_ready
}

stop() {
    if [[ -d "$ROOT" ]]; then
        ctl stop >/dev/null 2>&1 || true
        chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin ERL_EPMD_PORT="$EPMD_PORT" epmd -kill >/dev/null 2>&1 || true
        if mountpoint -q "$ROOT/proc"; then umount "$ROOT/proc" || true; fi
    fi
    log "stopped"
}

case "${1:-ensure}" in
    ensure) ensure ;;
    stop) stop ;;
    ctl)
        shift
        ctl "$@"
        ;;
    *) die "usage: $0 [ensure|stop|ctl ARGS...]" ;;
esac
