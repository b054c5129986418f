# shellcheck shell=bash
# The warden pair with model API rate limiting on (issue 6: h1 rps with a
# limit policy on must stay within 5% of off). The inbound is warden.sh's,
# plus a model route over every path that counts each request against a
# request rate and a concurrency limit at the identity, namespace and trust
# domain levels (limits high enough never to refuse: the cost is measured,
# not the refusals). The bench's GETs have no body, so no body is parsed.
#
#   VARIANT_PATH=$PWD/benches/peers ../shared/bench/peers/run.sh --variants "warden wardenrl" --scenarios h1
#
# shellcheck source=benches/peers/warden.sh
. "$(dirname "${BASH_SOURCE[0]}")/warden.sh"

# shellcheck disable=SC2034  # read indirectly by run.sh
wardenrl_scenarios="h1"

wardenrl_inbound() {
  local listen=$1 up=$2 d=$INST_DIR
  {
    _warden_identity "$3" "$4" "$5"
    printf 'inbound:\n  - name: bench\n    listen: 127.0.0.1:%s\n    app: 127.0.0.1:%s\n' "$listen" "$up"
    printf '    policy:\n      rules:\n        - name: client\n          action: allow\n          from: [%s]\n' "$CLIENT_SPIFFE_ID"
    printf '    model_api:\n      - name: all\n        paths: [/*]\n        api: openai\n        limits:\n'
    for level in identity namespace trust_domain; do
      printf '          %s:\n            requests_per_second: 1000000\n            burst: 1000000\n            concurrent: 100000\n' "$level"
    done
  } >"$d/warden.yaml"
  WARDEN_LOG=${WARDEN_LOG:-warn} exec "$(_warden_bin)" proxy --config "$d/warden.yaml"
}

wardenrl_outbound() {
  warden_outbound "$@"
}
