#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: repeatable to a fraction of a percent
# whatever else the machine is doing, unlike req/s. Use it to see what a change to the request path
# costs before reaching for wrk.
#
#   bash bench/instructions.sh BINARY [BINARY...]     # 2000 keep-alive requests to a public route
#   ROUTE=required bash bench/instructions.sh BINARY  # a required route with a valid token
#   ROUTE=refused bash bench/instructions.sh BINARY   # a required route with a bad token (401)
#   ROUTE=login bash bench/instructions.sh BINARY     # POST /auth/login of returning users, fresh codes
#   REQUESTS=500 KEEP=out.callgrind bash bench/instructions.sh BINARY  # keep the profile
#   ACCESS=1 bash bench/instructions.sh BINARY        # with the access log on (the default config)
#   ACCESS=1 FORMAT=json bash bench/instructions.sh BINARY  # ... as JSON lines
#
# Each binary runs under callgrind with instrumentation off while it starts and logs a person in
# (for the token); it is switched on for REQUESTS requests on one keep-alive connection and off
# again, so the count divided by REQUESTS is the cost of one request. Start-up work whose length
# depends on the clock (clock calibration, say) never enters the count. It counts wxgate's
# user-space instructions only: the kernel's share of a request (most of it, on loopback) is not
# seen. Under valgrind SHA-256 runs without the CPU's SHA extensions, so HMAC verification weighs
# several times what it does natively (see `cargo bench --bench request_path`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bench/instructions.sh BINARY [BINARY...]" >&2; exit 64; }
REQUESTS=${REQUESTS:-2000}
ROUTE=${ROUTE:-public}
case "$ROUTE" in
  public) REQUEST_PATH=/public/x ;;
  required | refused) REQUEST_PATH=/secure/x ;;
  login) REQUEST_PATH=/auth/login ;;
  *) echo "bench: ROUTE is public, required, refused or login" >&2; exit 64 ;;
esac

# shellcheck source=bench/common.sh
. bench/common.sh
need valgrind valgrind
need nginx nginx-light
need curl curl
WORK=$(mktemp -d)
VALGRIND_PID=
MOCK_PID=
cleanup() {
  [ -n "$VALGRIND_PID" ] && kill "$VALGRIND_PID" 2>/dev/null || true
  [ -n "$MOCK_PID" ] && kill "$MOCK_PID" 2>/dev/null || true
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

BACKEND=$(free_port)
PORT=$(free_port)
ADMIN=$(free_port)
WECHAT=$(free_port)
start_backend "$BACKEND" "$WORK"
start_mock "$1" "$WECHAT"
gate_config "$PORT" "$ADMIN" "$BACKEND" 1 "$WECHAT" >"$WORK/gate.toml"
# The access log is off, as in bench/versus.py; ACCESS=1 measures a request with its access line.
{
  echo '[log]'
  [ -n "${ACCESS:-}" ] || echo 'access = false'
  echo "format = \"${FORMAT:-text}\""
} >>"$WORK/gate.toml"

# instructions BINARY: callgrind's count for REQUESTS requests.
instructions() {
  local out="$WORK/callgrind.out"
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    "$1" --config "$WORK/gate.toml" >/dev/null 2>&1 &
  VALGRIND_PID=$!
  for _ in $(seq 200); do
    curl -sf -o /dev/null "http://127.0.0.1:$ADMIN/readyz" && break
    sleep 0.2
  done
  local token
  token=$(login "$PORT") || exit 1
  [ "$ROUTE" = refused ] && token="${token%?????}AAAAA"
  if [ "$ROUTE" = login ]; then
    # Each URL with its own body (`next` ends one URL's options): a fresh code per login, of one
    # of 100 people (the mock names the person by the code's first two characters), each of whom
    # has logged in once before the count: returning users, as in steady traffic.
    logins() { # FIRST COUNT: COUNT logins, person i % 100, codes numbered from FIRST
      python3 - "$PORT" "$1" "$2" <<'PY'
import string, sys
port, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
alphabet = string.ascii_letters + string.digits
for i in range(first, first + n):
    person = alphabet[i % 100 // 62] + alphabet[i % 100 % 62]
    print(f'url = "http://127.0.0.1:{port}/auth/login"')
    print('header = "Content-Type: application/json"')
    print(f'data = "{{\\"code\\":\\"{person}{i:030d}\\"}}"')
    print('output = "/dev/null"')
    if i + 1 < first + n:
        print("next")
PY
    }
    # Codes are single use, and the mock serves every binary of the run: each binary gets codes of
    # its own (numbered from RUN * 10^9), or the second would be counted failing logins of used codes.
    logins $((RUN * 1000000000)) 100 >"$WORK/people"
    curl -s -K "$WORK/people"
    logins $((RUN * 1000000000 + 100)) "$REQUESTS" >"$WORK/urls"
  else
    { # A header in curl's config applies to every URL in it.
      printf 'header = "Authorization: Bearer %s"\n' "$token"
      for _ in $(seq "$REQUESTS"); do
        printf 'url = "http://127.0.0.1:%s%s"\noutput = "/dev/null"\n' "$PORT" "$REQUEST_PATH"
      done
    } >"$WORK/urls"
  fi
  # One request first, outside the count: the connection to the backend is made on it.
  [ "$ROUTE" = login ] || curl -s -o /dev/null -H "Authorization: Bearer $token" "http://127.0.0.1:$PORT$REQUEST_PATH"
  callgrind_control -i on "$VALGRIND_PID" >/dev/null 2>&1
  curl -s -w '%{http_code}\n' -K "$WORK/urls" >"$WORK/statuses"
  callgrind_control -i off "$VALGRIND_PID" >/dev/null 2>&1
  kill -INT "$VALGRIND_PID"
  wait "$VALGRIND_PID" || true
  VALGRIND_PID=
  [ -n "${KEEP:-}" ] && cp "$out" "$KEEP"
  # A count of requests that failed is no count of the path meant.
  local expect=200 wrong
  [ "$ROUTE" = refused ] && expect=401
  wrong=$(grep -cv "^$expect\$" "$WORK/statuses" || true)
  if [ "$wrong" -ne 0 ]; then
    echo "bench: $wrong of $REQUESTS requests did not answer $expect ($1): not counted" >&2
    sort "$WORK/statuses" | uniq -c >&2
    exit 1
  fi
  awk '/^totals:/ { print $2 }' "$out"
}

printf '%-40s %14s\n' binary "instr/request ($ROUTE)"
RUN=0
for binary in "$@"; do
  RUN=$((RUN + 1))
  total=$(instructions "$binary")
  printf '%-40s %14d\n' "$binary" $((total / REQUESTS))
done
