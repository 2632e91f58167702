#!/usr/bin/env bash
# Load test of `courier serve` on file:// with wrk (Debian package `wrk`):
# POST /messages (one message per request) and POST /messages/batch (BATCH messages
# per request). Release build; data in target/bench-serve (removed afterwards).
# Usage: scripts/bench_serve.sh [DURATION_SECONDS] [CONNECTIONS] [BATCH]
# COURIER_BIN=path runs that binary instead of building one (to compare two builds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DUR="${1:-15}"; CONNS="${2:-64}"; BATCH="${3:-1000}"
command -v wrk >/dev/null || { apt-get install -y wrk >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y wrk >/dev/null); }
BIN="${COURIER_BIN:-target/release/courier}"
[ -n "${COURIER_BIN:-}" ] || cargo build --release -p courier-cli --no-default-features --bin courier >&2
DIR=target/bench-serve
rm -rf "$DIR"; mkdir -p "$DIR"
TOKEN="bench-$(date +%s%N)"
cat > "$DIR/serve.toml" <<TOML
[server]
listen = "127.0.0.1:0"
maxBodyBytes = 67108864
[server.rateLimit]
perSecond = 0
TOML
COURIER_ADMIN_TOKEN="$TOKEN" "$BIN" --url "file://$DIR/data" --config "$DIR/serve.toml" serve > "$DIR/out.txt" 2> "$DIR/err.txt" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 100); do grep -q listening "$DIR/out.txt" 2>/dev/null && break; sleep 0.1; done
BASE=$(grep -o 'http://[0-9.:]*' "$DIR/out.txt" | head -1)
curl -sf -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
  -d '{"name":"bench.events","partitions":4}' "$BASE/api/v1/mq/topics" >/dev/null
VALUE='{"eventType":"user_registered","userId":"123456","data":{"email":"user@example.com"}}'
cat > "$DIR/single.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
wrk.body = '{"topicName":"bench.events","key":"user_123456","value":$VALUE}'
LUA
python3 - "$DIR/batch.lua" "$TOKEN" "$BATCH" "$VALUE" <<'PY'
import json, sys
path, token, n, value = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
msgs = [{"topicName": "bench.events", "key": f"user_{i}", "value": json.loads(value)} for i in range(n)]
body = json.dumps({"messages": msgs}, separators=(",", ":"))
with open(path, "w") as f:
    f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
    f.write(f'wrk.headers["Authorization"] = "Bearer {token}"\n')
    f.write("wrk.body = [==[" + body + "]==]\n")
PY
echo "== POST /messages: wrk -t2 -c$CONNS -d${DUR}s --latency"
wrk -t2 -c"$CONNS" -d"${DUR}s" --latency -s "$DIR/single.lua" "$BASE/api/v1/mq/messages"
echo "== POST /messages/batch ($BATCH messages per request): wrk -t1 -c8 -d${DUR}s --latency"
wrk -t1 -c8 -d"${DUR}s" --latency -s "$DIR/batch.lua" "$BASE/api/v1/mq/messages/batch"
echo "== stored messages:"
curl -sf -H "Authorization: Bearer $TOKEN" "$BASE/api/v1/mq/topics/bench.events" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["messageCount"])'
