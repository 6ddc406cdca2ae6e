#!/usr/bin/env bash
# Logins per second through POST /auth/login, with the project's mock WeChat answering jscode2session
# (`wxgate mock-wechat --any-code`, so every request carries a fresh valid code) and the identity store
# in SQLite. The mock names the user by the code's first two characters: 3,844 users, so the first few
# thousand logins create users and the rest are returning users, as in real traffic.
#
#   bash bench/logins.sh                          # 3 rounds of 10 s
#   ROUNDS=1 DURATION=2s bash bench/logins.sh     # smoke run
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
WORKERS=${WORKERS:-1}

# shellcheck source=bench/common.sh
. bench/common.sh
need wrk wrk
GATE_PORT=$(free_port); ADMIN_PORT=$(free_port); MOCK_PORT=$(free_port)
WORK=$(mktemp -d)
cleanup() { kill ${GATE_PID:-} ${MOCK_PID:-} 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

cargo build --release --quiet
APPID=wx0123456789abcdef
./target/release/wxgate mock-wechat --listen "127.0.0.1:$MOCK_PORT" --app "$APPID:bench-secret" --any-code >"$WORK/mock.log" &
MOCK_PID=$!
cat >"$WORK/wxgate.toml" <<TOML
[server]
listen = "127.0.0.1:$GATE_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
workers = $WORKERS
[upstream]
url = "http://127.0.0.1:9"
[wechat]
api_base = "http://127.0.0.1:$MOCK_PORT"
[[apps]]
name = "shop"
kind = "miniprogram"
appid = "$APPID"
secret = "bench-secret"
[identity]
store = "sqlite://$WORK/identities.db"
[session]
signing_key = "bench-signing-key-0123456789abcdef-0123456789"
[limits]
# The benchmark is one client posting thousands of logins a second: the per-IP limit is off.
auth_per_minute = 0
TOML
RUST_LOG=warn ./target/release/wxgate --config "$WORK/wxgate.toml" 2>"$WORK/wxgate.log" &
GATE_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null && break; sleep 0.1; done

# Correctness first: a random code logs in.
curl -sf -XPOST "http://127.0.0.1:$GATE_PORT/auth/login" -d '{"code":"benchcheck0123456789abcdefghijkl"}' | grep -q access_token ||
  { echo "login through the mock failed" >&2; cat "$WORK/wxgate.log" >&2; exit 1; }

echo "wxgate logins: $ROUNDS round(s) of $DURATION, $CONNECTIONS connections, wxgate workers=$WORKERS, mock WeChat on its own thread"
for round in $(seq "$ROUNDS"); do
  wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency -s bench/login.lua "http://127.0.0.1:$GATE_PORT" 2>&1 |
    awk -v round="$round" '/Requests\/sec/ {rps=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} /Non-2xx/ {bad=$5}
      END {printf "round %s: %10s logins/s   p50 %-9s p99 %-9s %s\n", round, rps, p50, p99, (bad ? "NON-2XX " bad : "")}'
done
