#!/usr/bin/env bash
# Instructions per message of a hot-potato binary, counted by callgrind on the daemon process
# only: repeatable whatever else the machine does, so two builds can be compared on a busy
# 2-core machine where wall-clock runs cannot separate a few percent.
#
#   BIN=target/profiling/hot-potato N=3000 MIF=16 scripts/callgrind.sh
#   DAEMON_ENV="TARGET_DIRECT_HTTP1=false" …   (more settings for the daemon, space-separated)
#
# A quorum queue is preloaded with N messages of 256 bytes (through the management API), one
# enrollment (prefetch 1000, max_in_flight MIF) pushes them to the demo receiver, and the daemon
# is stopped with SIGTERM once the queue is empty; a second run with no message gives the start-up
# cost, which is subtracted. Needs valgrind, the local RabbitMQ 3.10 (scripts/ensure-broker.sh)
# and python3. Outputs stay in target/callgrind/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$ROOT/target/profiling/hot-potato}"
N="${N:-3000}"
MIF="${MIF:-16}"
MANAGEMENT=http://guest:guest@127.0.0.1:15672
OUT="$ROOT/target/callgrind"
mkdir -p "$OUT"
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed" >&2; exit 1; }
[[ -x "$BIN" ]] || { echo "callgrind.sh: no binary at $BIN (cargo build --profile profiling)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

TARGET_PORT="$(free_port)"
"$BIN" demo-receiver --port "$TARGET_PORT" >/dev/null 2>&1 &
RECEIVER=$!
trap 'kill $RECEIVER 2>/dev/null || true' EXIT

# Ir of one run with `count` messages.
run() {
    local count="$1" tag="$2" queue port dir vpid depth
    queue="callgrind-$tag-$RANDOM"
    curl -sf -X PUT -H 'content-type: application/json' \
        -d '{"durable":true,"arguments":{"x-queue-type":"quorum"}}' "$MANAGEMENT/api/queues/%2F/$queue"
    python3 - "$queue" "$count" <<'PY'
import base64, http.client, json, sys
queue, count = sys.argv[1], int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", 15672)
headers = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
           "content-type": "application/json"}
for i in range(count):
    conn.request("POST", "/api/exchanges/%2F/amq.default/publish", json.dumps(
        {"properties": {"message_id": f"m-{i}"}, "routing_key": queue,
         "payload": "x" * 256, "payload_encoding": "string"}), headers)
    conn.getresponse().read()
PY
    port="$(free_port)"
    dir="$(mktemp -d)"
    env -i PATH=/usr/bin:/bin AMQP_URL=amqp://guest:guest@127.0.0.1:5672 HTTP_PORT="$port" \
        SQLITE_BACKUP_PATH="$dir/db.sqlite" LOG_LEVEL=warn ${DAEMON_ENV:-} \
        valgrind --tool=callgrind --callgrind-out-file="$OUT/$tag.out" "$BIN" >"$dir/log" 2>&1 &
    vpid=$!
    for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
    curl -sf -X POST -H 'content-type: application/json' \
        -d "{\"queue\":\"/amq/queue/$queue\",\"target_url\":\"http://127.0.0.1:$TARGET_PORT/hook\",\"subscription_args\":{\"prefetch\":1000},\"delivery\":{\"max_in_flight\":$MIF}}" \
        "http://127.0.0.1:$port/enroll" >/dev/null
    for _ in $(seq 1 600); do
        depth="$(curl -sf "$MANAGEMENT/api/queues/%2F/$queue" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("messages",-1))')"
        [[ "$depth" == 0 ]] && break
        sleep 1
    done
    sleep 2
    kill -TERM "$vpid"
    wait "$vpid" || true
    curl -sf -X DELETE "$MANAGEMENT/api/queues/%2F/$queue"
    rm -rf "$dir"
    awk '/^summary:/ {print $2}' "$OUT/$tag.out"
}

idle="$(run 0 idle)"
busy="$(run "$N" busy)"
printf 'binary %s, max_in_flight %s, nothing else measured beside it (callgrind counts this process only)\n' "$BIN" "$MIF"
printf 'Ir with %s messages: %s; start-up alone: %s; per message: %s\n' "$N" "$busy" "$idle" \
    "$(( (busy - idle) / N ))"
printf 'profiles: %s/busy.out, %s/idle.out (callgrind_annotate)\n' "$OUT" "$OUT"
