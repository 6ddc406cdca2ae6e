#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: repeatable to a fraction of a percent
# whatever else the machine is doing, unlike req/s. Use it to see what a change to the request path
# costs before reaching for wrk.
#
#   bash bench/instructions.sh BINARY [BINARY...]     # 2000 keep-alive requests to a public route
#   REQUESTS=500 PATH_=/private bash bench/instructions.sh target/release/wxgate
#
# Each binary runs twice under callgrind, idle and with REQUESTS requests on one connection; the
# difference divided by REQUESTS is the cost of one request (startup cancels out). It counts wxgate's
# user-space instructions only: the kernel's share of a request (most of it, on loopback) is not seen.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bench/instructions.sh BINARY [BINARY...]" >&2; exit 64; }
REQUESTS=${REQUESTS:-2000}
REQUEST_PATH=${PATH_:-/public/x}

# shellcheck source=bench/common.sh
. bench/common.sh
need valgrind valgrind
need nginx nginx-light
need curl curl
WORK=$(mktemp -d)
VALGRIND_PID=
cleanup() {
  [ -n "$VALGRIND_PID" ] && kill "$VALGRIND_PID" 2>/dev/null || true
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

BACKEND=$(free_port)
PORT=$(free_port)
ADMIN=$(free_port)
start_backend "$BACKEND" "$WORK"
gate_config "$PORT" "$ADMIN" "$BACKEND" 1 >"$WORK/gate.toml"
printf '[log]\naccess = false\n' >>"$WORK/gate.toml"
for _ in $(seq "$REQUESTS"); do
  printf 'url = "http://127.0.0.1:%s%s"\noutput = "/dev/null"\n' "$PORT" "$REQUEST_PATH"
done >"$WORK/urls"

# instructions BINARY N: callgrind's total for a run that serves N requests.
instructions() {
  local out="$WORK/callgrind.out"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$1" --config "$WORK/gate.toml" \
    >/dev/null 2>&1 &
  VALGRIND_PID=$!
  for _ in $(seq 200); do
    curl -sf -o /dev/null "http://127.0.0.1:$ADMIN/readyz" && break
    sleep 0.2
  done
  [ "$2" -gt 0 ] && curl -s -K "$WORK/urls"
  kill -INT "$VALGRIND_PID"
  wait "$VALGRIND_PID" || true
  VALGRIND_PID=
  awk '/^totals:/ { print $2 }' "$out"
}

printf '%-40s %14s\n' binary "instr/request"
for binary in "$@"; do
  idle=$(instructions "$binary" 0)
  busy=$(instructions "$binary" "$REQUESTS")
  printf '%-40s %14d\n' "$binary" $(((busy - idle) / REQUESTS))
done
