# Shared by the bench scripts (sourced, not run): tools from Debian's packages, free ports, and the
# fixed backend every scenario forwards to.

# need COMMAND PACKAGE: installs PACKAGE when COMMAND is missing (as root), or explains.
need() {
  command -v "$1" >/dev/null 2>&1 && return
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  else
    echo "bench: $1 is missing; install the Debian package $2" >&2; exit 1
  fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_backend PORT DIR: nginx, one worker, `return 200` with a small body, no access log; its pid
# file is DIR/nginx.pid.
start_backend() {
  cat >"$2/nginx.conf" <<CONF
worker_processes 1;
pid $2/nginx.pid;
error_log $2/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$1;
    location / { return 200 "hello from the backend\n"; }
  }
}
CONF
  nginx -c "$2/nginx.conf"
}

# gate_config PORT ADMIN_PORT BACKEND_PORT WORKERS [WECHAT_PORT]: the wxgate config every proxy
# scenario uses, on stdout: /public/ is public, everything else required. With WECHAT_PORT, one mini
# program logs in through the WeChat there (start_mock), so the required route can be measured with a
# real token; its identity store is a file in \$WORK.
gate_config() {
  cat <<CONF
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
workers = $4
[upstream]
url = "http://127.0.0.1:$3"
[[routes]]
prefix = "/public/"
auth = "public"
[[routes]]
prefix = "/"
auth = "required"
CONF
  [ -n "${5:-}" ] || return 0
  cat <<CONF
[wechat]
api_base = "http://127.0.0.1:$5"
[[apps]]
name = "shop"
kind = "miniprogram"
appid = "$BENCH_APPID"
secret = "bench-secret"
[identity]
store = "sqlite://$WORK/identities-$1.db"
[session]
signing_key = "bench-signing-key-0123456789abcdef-0123456789"
[limits]
# One client posting thousands of logins: the per-address limit is off.
auth_per_minute = 0
CONF
}

BENCH_APPID=wx0123456789abcdef

# start_mock BINARY PORT: wxgate's mock WeChat accepting any code for the bench app, in the
# background; its pid is MOCK_PID. Waits until it listens.
start_mock() {
  "$1" mock-wechat --listen "127.0.0.1:$2" --app "$BENCH_APPID:bench-secret" --any-code >/dev/null 2>&1 &
  MOCK_PID=$!
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$2/" && return 0
    sleep 0.1
  done
  echo "bench: the mock WeChat did not start" >&2
  exit 1
}

# login PORT: logs one person in through wxgate at PORT with a fresh code (codes are single use);
# prints the access token, or fails.
login() {
  local code body
  code=bq$(tr -dc 'A-Za-z0-9' </dev/urandom | head -c 30)
  body=$(curl -sf -X POST -H 'Content-Type: application/json' -d "{\"code\":\"$code\"}" \
    "http://127.0.0.1:$1/auth/login") || { echo "bench: the login failed" >&2; return 1; }
  python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])' <<<"$body"
}
