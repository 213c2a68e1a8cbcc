#!/usr/bin/env bash
# Makes sure an AMQP 1.0 broker answers at AMQP_URL.
#
# - AMQP_URL comes from the environment, else from .env in the repository root, else
#   amqp://localhost:5672 (the daemon's own default).
# - If something already accepts TCP on the URL's host and port, there is nothing to do.
# - If the host is this machine (localhost, 127.x, ::1), RabbitMQ is installed from Debian's
#   packages when missing, the AMQP 1.0 and management plugins are enabled, the node is started,
#   and the script waits (up to 120 s) for port 5672 and the management API on 15672.
# - If the host is another machine and cannot be reached, a warning is printed and the script
#   still succeeds: hot-potato reconnects by itself once the broker is up.
#
# Idempotent; needs root only when it has to install or start RabbitMQ.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Debian keeps the RabbitMQ tools in /usr/sbin, which is not on every PATH.
export PATH="${PATH}:/usr/local/sbin:/usr/sbin:/sbin"

WAIT_SECONDS=120
MANAGEMENT_URL="http://127.0.0.1:15672/api/overview"

log() { printf 'ensure-broker: %s\n' "$*"; }
warn() { printf 'ensure-broker: warning: %s\n' "$*" >&2; }
die() {
    printf 'ensure-broker: error: %s\n' "$*" >&2
    exit 1
}

# AMQP_URL from the environment, else the first AMQP_URL= line of .env (the one the daemon
# uses; quotes and an unquoted trailing " # comment" removed), else the default. .env is parsed,
# never sourced.
read_amqp_url() {
    if [[ -n "${AMQP_URL:-}" ]]; then
        printf '%s' "$AMQP_URL"
        return
    fi
    local env_file="$ROOT/.env" line value
    if [[ -f "$env_file" ]]; then
        line="$(grep -E '^[[:space:]]*(export[[:space:]]+)?AMQP_URL[[:space:]]*=' "$env_file" | head -n 1 || true)"
        if [[ -n "$line" ]]; then
            value="${line#*=}"
            value="${value#"${value%%[![:space:]]*}"}"
            case "$value" in
                \"*) value="${value#\"}" && value="${value%%\"*}" ;;
                \'*) value="${value#\'}" && value="${value%%\'*}" ;;
                *) value="${value%%[[:space:]]#*}" && value="${value%"${value##*[![:space:]]}"}" ;;
            esac
            if [[ -n "$value" ]]; then
                printf '%s' "$value"
                return
            fi
        fi
    fi
    printf '%s' "amqp://localhost:5672"
}

# Splits AMQP_URL into BROKER_HOST and BROKER_PORT (5672 for amqp, 5671 for amqps, as the
# daemon does when the URL names no port).
parse_url() {
    local url="$1" scheme rest authority hostport
    if [[ "$url" != *://* ]]; then
        die "AMQP_URL is not a URL: $url"
    fi
    scheme="${url%%://*}"
    scheme="${scheme,,}"
    rest="${url#*://}"
    authority="${rest%%[/?#]*}"
    hostport="${authority##*@}"
    if [[ "$hostport" == \[* ]]; then
        BROKER_HOST="${hostport#[}"
        BROKER_HOST="${BROKER_HOST%%]*}"
        BROKER_PORT="${hostport#*]}"
        BROKER_PORT="${BROKER_PORT#:}"
    elif [[ "$hostport" == *:* ]]; then
        BROKER_HOST="${hostport%%:*}"
        BROKER_PORT="${hostport#*:}"
    else
        BROKER_HOST="$hostport"
        BROKER_PORT=""
    fi
    BROKER_HOST="${BROKER_HOST,,}"
    if [[ -z "$BROKER_PORT" ]]; then
        if [[ "$scheme" == "amqps" ]]; then BROKER_PORT=5671; else BROKER_PORT=5672; fi
    fi
    [[ -n "$BROKER_HOST" ]] || die "AMQP_URL has no host: $url"
    [[ "$BROKER_PORT" =~ ^[0-9]+$ ]] || die "AMQP_URL has an invalid port: $BROKER_PORT"
}

# True when host:port accepts a TCP connection within 2 seconds.
tcp_open() {
    # shellcheck disable=SC2016 # $1 and $2 expand in the inner shell, on purpose
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

is_local_host() {
    case "$1" in
        localhost | localhost.localdomain | ::1 | 127.*) return 0 ;;
        *) return 1 ;;
    esac
}

management_ok() {
    command -v curl >/dev/null 2>&1 &&
        curl -sf --max-time 5 -u guest:guest "$MANAGEMENT_URL" >/dev/null 2>&1
}

rabbitmq_installed() {
    command -v rabbitmq-server >/dev/null 2>&1 && command -v rabbitmqctl >/dev/null 2>&1
}

# True when the Erlang node runs (its application may be stopped).
node_running() {
    timeout 60 rabbitmqctl ping >/dev/null 2>&1
}

require_root() {
    if [[ "$(id -u)" -ne 0 ]]; then
        die "$1 needs root; run this script as root (or with sudo)"
    fi
}

install_packages() {
    require_root "installing $*"
    log "installing $* from the Debian archive"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

enable_plugins() {
    log "enabling the rabbitmq_amqp1_0 and rabbitmq_management plugins"
    rabbitmq-plugins enable --offline rabbitmq_amqp1_0 rabbitmq_management >/dev/null
}

# Applies the enabled plugins to a node whose application is running (for example one the
# package's maintainer scripts started before the plugins were enabled).
enable_plugins_online() {
    rabbitmq-plugins enable rabbitmq_amqp1_0 rabbitmq_management >/dev/null ||
        warn "could not enable the plugins on the running node"
}

start_node() {
    if node_running; then
        log "the RabbitMQ node runs but its port is closed; starting its application"
        rabbitmqctl start_app >/dev/null
        enable_plugins_online
    elif [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
        log "starting rabbitmq-server with systemd"
        systemctl start rabbitmq-server
    else
        log "starting rabbitmq-server -detached"
        # Each enrollment holds a connection (unless AMQP_CONNECTION_POOL is set): the default
        # 1024 open files leave RabbitMQ about 830 sockets, too few for a 1,000-enrollment fleet.
        # Debian's wrapper switches user with `su`, which resets the limit, so as root the
        # server is started as the rabbitmq user directly, keeping the raised limit.
        ulimit -n 16384 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
        if [[ "$(id -u)" -eq 0 ]] && id rabbitmq >/dev/null 2>&1 && command -v setpriv >/dev/null 2>&1 &&
            [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]]; then
            (cd /var/lib/rabbitmq &&
                setpriv --reuid rabbitmq --regid rabbitmq --init-groups \
                    env HOME=/var/lib/rabbitmq /usr/lib/rabbitmq/bin/rabbitmq-server -detached)
        else
            rabbitmq-server -detached
        fi
    fi
}

wait_until_ready() {
    local host="$1" port="$2" deadline=$((SECONDS + WAIT_SECONDS))
    log "waiting up to ${WAIT_SECONDS}s for $host:$port and the management API"
    while ((SECONDS < deadline)); do
        if tcp_open "$host" "$port" && management_ok; then
            log "RabbitMQ is ready: AMQP on $host:$port, management API on http://127.0.0.1:15672"
            return 0
        fi
        sleep 2
    done
    local state="port $port closed"
    if tcp_open "$host" "$port"; then state="port $port open but the management API does not answer"; fi
    die "RabbitMQ did not become ready within ${WAIT_SECONDS}s ($state); see /var/log/rabbitmq/ and 'rabbitmqctl status'"
}

main() {
    local url
    url="$(read_amqp_url)"
    parse_url "$url"

    if tcp_open "$BROKER_HOST" "$BROKER_PORT"; then
        log "a broker already accepts connections on $BROKER_HOST:$BROKER_PORT"
        # Port 5672 also answers when only AMQP 0-9-1 is on: make sure a local RabbitMQ has
        # its plugins, which the management API answering shows.
        if is_local_host "$BROKER_HOST" && rabbitmq_installed && [[ "$(id -u)" -eq 0 ]] && ! management_ok; then
            if ! command -v curl >/dev/null 2>&1; then
                install_packages curl
            fi
            if ! management_ok; then
                enable_plugins
                enable_plugins_online
                wait_until_ready "$BROKER_HOST" "$BROKER_PORT"
            fi
        fi
        exit 0
    fi

    if ! is_local_host "$BROKER_HOST"; then
        warn "nothing answers on $BROKER_HOST:$BROKER_PORT; hot-potato will keep reconnecting until it does"
        exit 0
    fi

    if [[ "$BROKER_PORT" != 5672 ]]; then
        die "nothing answers on $BROKER_HOST:$BROKER_PORT, and the local RabbitMQ this script sets up listens on 5672; change AMQP_URL or start your broker"
    fi
    log "nothing answers on $BROKER_HOST:$BROKER_PORT; setting up a local RabbitMQ"
    if ! rabbitmq_installed; then
        install_packages rabbitmq-server curl
    elif ! command -v curl >/dev/null 2>&1; then
        install_packages curl
    fi
    rabbitmq_installed || die "rabbitmq-server is still not installed"
    require_root "starting RabbitMQ"

    enable_plugins
    # The package's maintainer scripts may have started the node meanwhile.
    if tcp_open "$BROKER_HOST" "$BROKER_PORT"; then
        enable_plugins_online
    else
        start_node
    fi
    wait_until_ready "$BROKER_HOST" "$BROKER_PORT"
}

main "$@"
