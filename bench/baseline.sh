#!/usr/bin/env bash
# Baseline: requests per second and latency straight to a fixed backend, and through wxgate to the same
# backend, on loopback. The backend is nginx with one worker answering `return 200` with a small body,
# so the backend itself is never the bottleneck being measured.
#
#   bash bench/baseline.sh                 # 3 rounds of 10 s per scenario
#   ROUNDS=1 DURATION=2s bash bench/baseline.sh   # smoke run
#
# Needs wrk and nginx (installed from Debian's packages when missing and running as root).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
WORKERS=${WORKERS:-1}

# shellcheck source=bench/common.sh
. bench/common.sh
need wrk wrk
need nginx nginx-light

BACKEND_PORT=$(free_port); GATE_PORT=$(free_port); ADMIN_PORT=$(free_port)
WORK=$(mktemp -d)
cleanup() {
  [ -n "${GATE_PID:-}" ] && kill "$GATE_PID" 2>/dev/null || true
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start_backend "$BACKEND_PORT" "$WORK"

cargo build --release --quiet
gate_config "$GATE_PORT" "$ADMIN_PORT" "$BACKEND_PORT" "$WORKERS" >"$WORK/wxgate.toml"
RUST_LOG=warn ./target/release/wxgate --config "$WORK/wxgate.toml" 2>"$WORK/wxgate.log" &
GATE_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null && break; sleep 0.1; done

# Correctness first: a benchmark of a proxy that forgot to check is void.
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GATE_PORT/public/bench")" = 200 ] || { echo "public route broken" >&2; exit 1; }
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GATE_PORT/private/bench")" = 401 ] || { echo "required route not enforced" >&2; exit 1; }

# Same path length and headers in every scenario.
run() { # name url connections threads
  wrk -t"$4" -c"$3" -d"$DURATION" --latency -H "Authorization: Bearer bench-token-0123456789" "$2" 2>&1 |
    awk -v name="$1" '
      /Requests\/sec/ {rps=$2}
      /^ +50%/ {p50=$2} /^ +99%/ {p99=$2}
      /Non-2xx/ {non2xx=$5}
      /Socket errors/ {errors=$0}
      END {printf "%-28s %12s req/s   p50 %-9s p99 %-9s %s %s\n", name, rps, p50, p99, (non2xx ? "non-2xx " non2xx : ""), errors}'
}

echo "wxgate baseline: $ROUNDS round(s) of $DURATION, $CONNECTIONS connections, wxgate workers=$WORKERS, $(nproc) cores"
for round in $(seq "$ROUNDS"); do
  echo "round $round"
  wrk -t2 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$GATE_PORT/public/bench" >/dev/null 2>&1 # warm-up, discarded
  run "backend direct (c=$CONNECTIONS)" "http://127.0.0.1:$BACKEND_PORT/public/bench" "$CONNECTIONS" 2
  run "wxgate public (c=$CONNECTIONS)" "http://127.0.0.1:$GATE_PORT/public/bench" "$CONNECTIONS" 2
  run "wxgate 401 (c=$CONNECTIONS)" "http://127.0.0.1:$GATE_PORT/private/bench" "$CONNECTIONS" 2
  run "backend direct (c=1)" "http://127.0.0.1:$BACKEND_PORT/public/bench" 1 1
  run "wxgate public (c=1)" "http://127.0.0.1:$GATE_PORT/public/bench" 1 1
done
