# shellcheck shell=bash
# warden pair for ../shared/bench/peers (the hook contract is in its README).
# Same security as in production: chain and SPIFFE ID verified on both sides,
# the inbound's authorization policy evaluated (default deny, the client's ID
# allowed), the identity header injected. One worker thread per proxy.
#
#   VARIANT_PATH=$PWD/benches/peers ../shared/bench/peers/run.sh --variants "nginx haproxy warden"
#
# WARDEN_BIN: the binary (default: target/release/warden of this checkout).
# shellcheck disable=SC2034  # read indirectly by run.sh
warden_scenarios="h1 h2 conn"

_warden_bin() {
  echo "${WARDEN_BIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/release/warden}"
}

_warden_identity() {
  printf 'identity:\n  cert: %s\n  key: %s\n  bundle: %s\nadmin: 127.0.0.1:0\nworkers: %s\n' "$1" "$2" "$3" "${WORKERS:-1}"
}

# warden_inbound LISTEN UPSTREAM CERT KEY CA
warden_inbound() {
  local listen=$1 up=$2 d=$INST_DIR
  {
    _warden_identity "$3" "$4" "$5"
    printf 'inbound:\n  - name: bench\n    listen: 127.0.0.1:%s\n    app: 127.0.0.1:%s\n' "$listen" "$up"
    printf '    policy:\n      rules:\n        - name: client\n          action: allow\n          from: [%s]\n' "$CLIENT_SPIFFE_ID"
  } >"$d/warden.yaml"
  WARDEN_LOG=${WARDEN_LOG:-warn} exec "$(_warden_bin)" proxy --config "$d/warden.yaml"
}

# warden_outbound LISTEN UPSTREAM CERT KEY CA
warden_outbound() {
  local listen=$1 up=$2 d=$INST_DIR pool=true
  # conn: a new upstream mTLS connection per downstream connection (warden
  # never resumes TLS sessions, so each is a full handshake).
  [ "$SCENARIO" = conn ] && pool=false
  {
    _warden_identity "$3" "$4" "$5"
    printf 'outbound:\n  - name: bench\n    listen: 127.0.0.1:%s\n    destination: 127.0.0.1:%s\n' "$listen" "$up"
    printf '    server_id: %s\n    pool: %s\n' "$SERVER_SPIFFE_ID" "$pool"
  } >"$d/warden.yaml"
  WARDEN_LOG=${WARDEN_LOG:-warn} exec "$(_warden_bin)" proxy --config "$d/warden.yaml"
}
