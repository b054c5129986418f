# shellcheck shell=bash
# The warden pair built from another commit (WARDEN_BASE_BIN), with the same
# configs as warden.sh: a change's before/after ratio from one interleaved run,
# free of the drift between runs on different days.
#
#   git worktree add --detach /tmp/base <commit> && (cd /tmp/base && cargo build --release)
#   WARDEN_BASE_BIN=/tmp/base/target/release/warden VARIANT_PATH=$PWD/benches/peers \
#     ../shared/bench/peers/run.sh --variants "haproxy wardenbase warden" --scenarios "h1 h2 conn rate"
#
# shellcheck source=benches/peers/warden.sh
. "$(dirname "${BASH_SOURCE[0]}")/warden.sh"

# shellcheck disable=SC2034  # read indirectly by run.sh
wardenbase_scenarios="$warden_scenarios"

wardenbase_inbound() {
  WARDEN_BIN=${WARDEN_BASE_BIN:?set WARDEN_BASE_BIN to the baseline binary} warden_inbound "$@"
}

wardenbase_outbound() {
  WARDEN_BIN=${WARDEN_BASE_BIN:?set WARDEN_BASE_BIN to the baseline binary} warden_outbound "$@"
}
