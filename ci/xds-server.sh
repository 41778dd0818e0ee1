#!/usr/bin/env bash
# Builds xds-snapshot-server, the thin wrapper around the third-party nebucloud-xds control plane
# that xDS client tests run as their server, and prints the binary's absolute path. Safe to
# re-run; the second run is cargo's no-op build and only prints the path.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
package=$root/xds-adapter/nebucloud-server

# It is its own workspace with its own Cargo.lock (tonic 0.12 / prost 0.13, which nebucloud-xds
# needs), so --locked builds exactly what was committed. The target dir is given explicitly so
# the path printed below does not depend on CARGO_TARGET_DIR or on the caller's directory.
target=$package/target
cargo build --release --locked \
    --manifest-path "$package/Cargo.toml" --target-dir "$target" >&2

binary=$target/release/xds-snapshot-server
if [[ ! -x $binary ]]; then
    echo "cargo finished but $binary is missing" >&2
    exit 1
fi
echo "$binary"
