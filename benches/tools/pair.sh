#!/usr/bin/env bash
# Starts a warden pair on loopback for profiling or memory measurements:
#   backend (nginx, 64-byte body) <- inbound warden <- mTLS <- outbound warden <- you
# Usage: benches/tools/pair.sh DIR    (prints the ports and PIDs, leaves everything running;
#        stop with: kill $(cat DIR/pids))
set -euo pipefail
dir=${1:?usage: pair.sh DIR}
bin=${WARDEN_BIN:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/warden}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
: >"$dir/pids"
"$bin" ca init --dir "$dir/ca" --trust-domain bench.local >/dev/null
"$bin" ca issue --dir "$dir/ca" --spiffe-id spiffe://bench.local/server --out-dir "$dir/server" >/dev/null
"$bin" ca issue --dir "$dir/ca" --spiffe-id spiffe://bench.local/client --out-dir "$dir/client" >/dev/null

cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/t1; proxy_temp_path $dir/t2; fastcgi_temp_path $dir/t3; uwsgi_temp_path $dir/t4; scgi_temp_path $dir/t5;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:${BACKEND_PORT:-29080}; location / { default_type text/plain; return 200 "$(head -c 64 /dev/zero | tr '\0' x)"; } }
}
EOF
nginx -e "$dir/nginx.err" -p "$dir" -c "$dir/nginx.conf" & echo $! >>"$dir/pids"

ident() { printf 'identity:\n  cert: %s/cert.pem\n  key: %s/key.pem\n  bundle: %s/bundle.pem\nadmin: 127.0.0.1:0\nworkers: %s\n' "$1" "$1" "$1" "${WORKERS:-1}"; }
{ ident "$dir/server"; printf 'inbound:\n  - name: in\n    listen: 127.0.0.1:%s\n    app: 127.0.0.1:%s\n    policy:\n      rules:\n        - {name: client, action: allow, from: [spiffe://bench.local/client]}\n' "${INBOUND_PORT:-29082}" "${BACKEND_PORT:-29080}"; } >"$dir/in.yaml"
{ ident "$dir/client"; printf 'outbound:\n  - name: out\n    listen: 127.0.0.1:%s\n    destination: 127.0.0.1:%s\n    server_id: spiffe://bench.local/server\n' "${OUTBOUND_PORT:-29081}" "${INBOUND_PORT:-29082}"; } >"$dir/out.yaml"
WARDEN_LOG=warn "$bin" proxy --config "$dir/in.yaml" >"$dir/in.out" 2>"$dir/in.err" & echo $! >>"$dir/pids"; echo "inbound pid $!"
WARDEN_LOG=warn "$bin" proxy --config "$dir/out.yaml" >"$dir/out.out" 2>"$dir/out.err" & echo $! >>"$dir/pids"; echo "outbound pid $!"
sleep 1
echo "outbound http://127.0.0.1:${OUTBOUND_PORT:-29081}/  inbound mTLS 127.0.0.1:${INBOUND_PORT:-29082}"
