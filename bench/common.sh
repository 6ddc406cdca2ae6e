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

# gate_config PORT ADMIN_PORT BACKEND_PORT WORKERS: the wxgate config every proxy scenario uses, on
# stdout: /public/ is public, everything else required.
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
}
