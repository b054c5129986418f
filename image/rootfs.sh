#!/usr/bin/env bash
# Gathers the image's whole filesystem into DIR: the release binary, the
# shared libraries it links (as ldd names them), the CA roots, and a passwd
# entry for UID 65532. Builds the binary first if it is not there;
# WARDEN_BIN=PATH takes that binary instead (a debug build, a copy).
set -euo pipefail
out="${1:?usage: image/rootfs.sh DIR}"
cd "$(dirname "$0")/.."
bin="${WARDEN_BIN:-target/release/warden}"
[ -x "$bin" ] || [ -n "${WARDEN_BIN:-}" ] || cargo build --release --locked --bin warden
[ -x "$bin" ] || { echo "rootfs.sh: $bin is not an executable" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out/usr/local/bin" "$out/etc/ssl/certs"
cp "$bin" "$out/usr/local/bin/warden"
for lib in $(ldd "$bin" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
  cp --parents -L "$lib" "$out"
done
cp /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/"
echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin' > "$out/etc/passwd"
echo 'nonroot:x:65532:' > "$out/etc/group"
