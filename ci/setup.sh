#!/usr/bin/env bash
# Installs what building and testing Shunt needs. Safe to re-run.
set -euo pipefail

# Miri and loom runs use the nightly toolchain's Miri component.
if ! cargo +nightly miri --version >/dev/null 2>&1; then
    rustup component add --toolchain nightly miri rust-src
fi
rustup component add rustfmt clippy >/dev/null

if ! command -v cargo-nextest >/dev/null 2>&1; then
    cargo install --locked cargo-nextest@0.9.143
fi

if ! cargo fuzz --version 2>/dev/null | grep -q '0.13.1'; then
    cargo install --locked cargo-fuzz@0.13.1
fi

# Tools the tests run as real peers: openssl (TLS interop), nm (the Envoy ABI drift check).
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v nm >/dev/null 2>&1 || missing+=(binutils)
if ((${#missing[@]})); then
    sudo_cmd=""
    [[ $(id -u) -ne 0 ]] && sudo_cmd=sudo
    $sudo_cmd apt-get update -qq
    $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi

# The pinned Envoy for the module's tests (cached after the first run).
bash "$(dirname "$0")/envoy.sh" >/dev/null

# The third-party xDS control plane (nebucloud-xds) that shunt-xds's interop tests run against.
bash "$(dirname "$0")/xds-server.sh" >/dev/null
