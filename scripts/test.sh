#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine and runs the whole workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/build-plugins.sh

echo "==> running the workspace tests"
cargo test --workspace --locked "$@"
