#!/usr/bin/env bash
# Sets up and runs every check CI runs: formatting, lints, the test suite, Miri and loom.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/setup.sh

echo "== cargo fmt"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo nextest"
# The Envoy benchmark's test loads the release module; build it before the clock starts.
cargo build --release --locked -p shunt-envoy
cargo nextest run --workspace --locked --no-fail-fast

echo "== cargo nextest, wake-up pipes polled level-triggered (kernels 5.5 to 5.15)"
SHUNT_WAKE_LEVEL_TRIGGERED=1 cargo nextest run --locked --no-fail-fast \
    -p shunt-shm -p shuntd --lib --test cut_through --test adversary --test deliveries --test restart

echo "== miri (shared-memory FIFOs and rings)"
MIRIFLAGS="${MIRIFLAGS:-}" cargo +nightly miri test --locked -p shunt-shm --lib

echo "== loom (SPSC and notification protocols)"
RUSTFLAGS="--cfg loom" cargo test --locked --release -p shunt-shm --test loom

echo "== cargo fuzz (session-API decoders; the corpus also runs in nextest)"
# New inputs go to a scratch directory; the committed corpus only seeds the run.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in request daemon_reply event; do
    mkdir -p "$scratch/$target"
    (cd stack/sapi && cargo +nightly fuzz run "$target" "$scratch/$target" "fuzz/corpus/$target" \
        -- -max_total_time="${FUZZ_SECONDS:-20}" -max_len=4096)
done
