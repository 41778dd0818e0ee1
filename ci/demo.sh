#!/usr/bin/env bash
# Sets up, starts shuntd, and runs two apps through cut-through next to kernel TCP loopback;
# then two real Envoy sidecars: Shunt's module (mutual TLS, then cut-through) next to Envoy's
# own mutual TLS as Istio configures it, plain Envoy, and no Envoy at all.
# SHUNT_DEMO_ENVOY=0 skips the Envoy part.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/setup.sh
cargo build --release --locked -p shuntd --bin shuntd -p shunt-client --example demo

dir=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$dir"' EXIT
cat >"$dir/shuntd.yaml" <<YAML
app_socket: $dir/shuntd.sock
control_socket: $dir/control.sock
metrics_address: 127.0.0.1:0
YAML
RUST_LOG=warn target/release/shuntd --config "$dir/shuntd.yaml" &
pid=$!
for _ in $(seq 100); do [ -S "$dir/shuntd.sock" ] && break; sleep 0.05; done
[ -S "$dir/shuntd.sock" ] || { echo "shuntd did not start" >&2; exit 1; }
target/release/examples/demo "$dir/shuntd.sock" "${DEMO_BYTES:-2147483648}"

if [ "${SHUNT_DEMO_ENVOY:-1}" != 0 ]; then
    echo
    echo "== two Envoy 1.40 sidecars: client -> Envoy -> Envoy -> backend"
    cargo run --release --locked -q -p shunt-bench -- envoy --bytes "${DEMO_ENVOY_BYTES:-2G}" --duration 1
fi
