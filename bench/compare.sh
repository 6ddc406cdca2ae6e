#!/usr/bin/env bash
# A/B: two wxgate binaries side by side on the same nginx backend, scenarios interleaved round-robin,
# to see what a change to the request path costs when the machine's own speed drifts between runs.
#
#   bash bench/compare.sh OLD_BINARY NEW_BINARY           # 5 rounds of 10 s
#   ROUNDS=1 DURATION=2s bash bench/compare.sh A B        # smoke run
#
# Both run with `workers = 1` and the same routes as bench/versus.py uses. Prints each round and the
# median per scenario.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: bench/compare.sh OLD_BINARY NEW_BINARY}
NEW=${2:?usage: bench/compare.sh OLD_BINARY NEW_BINARY}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}

# shellcheck source=bench/common.sh
. bench/common.sh
need wrk wrk
need nginx nginx-light
need bc bc
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

BACKEND_PORT=$(free_port)
start_backend "$BACKEND_PORT" "$WORK"

start() { # name binary; sets PORT
  local admin
  PORT=$(free_port); admin=$(free_port)
  gate_config "$PORT" "$admin" "$BACKEND_PORT" 1 >"$WORK/$1.toml"
  RUST_LOG=warn "$2" --config "$WORK/$1.toml" >/dev/null 2>"$WORK/$1.log" &
  PIDS+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/public/bench")" = 200 ] || { echo "$1: public route broken" >&2; exit 1; }
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/private/bench")" = 401 ] || { echo "$1: required route not enforced" >&2; exit 1; }
}
start old "$OLD"; OLD_PORT=$PORT
start new "$NEW"; NEW_PORT=$PORT

rps() { # url connections threads
  wrk -t"$3" -c"$2" -d"$DURATION" -H "Authorization: Bearer bench-token-0123456789" "$1" 2>&1 | awk '/Requests\/sec/ {print $2}'
}
declare -A results
for round in $(seq "$ROUNDS"); do
  line="round $round:"
  for scenario in public private; do
    for side in old new; do
      port=$([ "$side" = old ] && echo "$OLD_PORT" || echo "$NEW_PORT")
      wrk -t2 -c"$CONNECTIONS" -d1s "http://127.0.0.1:$port/$scenario/bench" >/dev/null 2>&1 # warm-up
      value=$(rps "http://127.0.0.1:$port/$scenario/bench" "$CONNECTIONS" 2)
      results[$scenario-$side]+="$value "
      line+=" $scenario/$side $value"
    done
  done
  echo "$line"
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
for scenario in public private; do
  old=$(echo "${results[$scenario-old]}" | median); new=$(echo "${results[$scenario-new]}" | median)
  printf "%-8s old %10.0f req/s   new %10.0f req/s   new/old %.3f\n" "$scenario" "$old" "$new" "$(echo "$new / $old" | bc -l)"
done
