#!/usr/bin/env bash
# A/B: two wxgate binaries side by side on the same nginx backend, scenarios interleaved round-robin,
# to see what a change to the request path costs when the machine's own speed drifts between runs.
#
#   bash bench/compare.sh OLD_BINARY NEW_BINARY           # 5 rounds of 10 s
#   ROUNDS=1 DURATION=2s bash bench/compare.sh A B        # smoke run
#
# Both run with `workers = 1` and the same routes as bench/versus.py uses, and log a person in
# through the mock WeChat for a real token. Scenarios: a public route, a required route with that
# token, and a required route with a bad one (401). Prints each round and the median per scenario.
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
need curl curl
WORK=$(mktemp -d)
PIDS=()
MOCK_PID=
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -n "$MOCK_PID" ] && kill "$MOCK_PID" 2>/dev/null || true
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

BACKEND_PORT=$(free_port)
WECHAT_PORT=$(free_port)
start_backend "$BACKEND_PORT" "$WORK"
start_mock "$NEW" "$WECHAT_PORT"

start() { # name binary; sets PORT and TOKEN
  local admin
  PORT=$(free_port); admin=$(free_port)
  gate_config "$PORT" "$admin" "$BACKEND_PORT" 1 "$WECHAT_PORT" >"$WORK/$1.toml"
  printf '[log]\naccess = false\n' >>"$WORK/$1.toml"
  RUST_LOG=warn "$2" --config "$WORK/$1.toml" >/dev/null 2>"$WORK/$1.log" &
  PIDS+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
  TOKEN=$(login "$PORT")
  code() { curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $2" "http://127.0.0.1:$PORT$1"; }
  [ "$(code /public/bench x)" = 200 ] || { echo "$1: public route broken" >&2; exit 1; }
  [ "$(code /private/bench "$TOKEN")" = 200 ] || { echo "$1: the token is refused" >&2; exit 1; }
  [ "$(code /private/bench "${TOKEN%?????}AAAAA")" = 401 ] || { echo "$1: a bad token is accepted" >&2; exit 1; }
}
start old "$OLD"; OLD_PORT=$PORT; OLD_TOKEN=$TOKEN
start new "$NEW"; NEW_PORT=$PORT; NEW_TOKEN=$TOKEN

rps() { # url token
  wrk -t2 -c"$CONNECTIONS" -d"$DURATION" -H "Authorization: Bearer $2" "$1" 2>&1 | awk '/Requests\/sec/ {print $2}'
}
declare -A results
SCENARIOS="public required refused"
for round in $(seq "$ROUNDS"); do
  line="round $round:"
  for scenario in $SCENARIOS; do
    for side in old new; do
      if [ "$side" = old ]; then port=$OLD_PORT token=$OLD_TOKEN; else port=$NEW_PORT token=$NEW_TOKEN; fi
      path=/private/bench
      case "$scenario" in
        public) path=/public/bench ;;
        refused) token="${token%?????}AAAAA" ;;
      esac
      wrk -t2 -c"$CONNECTIONS" -d1s -H "Authorization: Bearer $token" "http://127.0.0.1:$port$path" >/dev/null 2>&1 # warm-up
      value=$(rps "http://127.0.0.1:$port$path" "$token")
      results[$scenario-$side]+="$value "
      line+=" $scenario/$side $value"
    done
  done
  echo "$line"
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
for scenario in $SCENARIOS; do
  old=$(echo "${results[$scenario-old]}" | median); new=$(echo "${results[$scenario-new]}" | median)
  printf "%-9s old %10.0f req/s   new %10.0f req/s   new/old %.3f\n" "$scenario" "$old" "$new" "$(echo "$new / $old" | bc -l)"
done
