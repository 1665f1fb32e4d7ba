#!/usr/bin/env bash
# Install the system packages the Rust crates need to build (RocksDB and librdkafka are
# compiled from source: cmake, a C++ toolchain, clang for bindgen, and a few -dev headers).
# Idempotent: does nothing when everything is present.
set -euo pipefail

packages=(cmake clang libclang-dev libcurl4-openssl-dev libssl-dev libsasl2-dev libzstd-dev pkg-config g++ make openssl curl)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing system packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
