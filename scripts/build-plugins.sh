#!/usr/bin/env bash
# Builds every plugin from source: the Rust SDK ones in plugins/ (wasm32-wasip1) and the
# AssemblyScript test plugin (npm). Idempotent; cargo and npm skip what is up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  echo "==> installing the wasm32-wasip1 target"
  rustup target add wasm32-wasip1
fi

echo "==> building Rust SDK plugins (plugins/)"
(cd plugins && cargo build --release --target wasm32-wasip1 --locked --quiet)
# One debug build, whose DWARF the backtrace test reads file and line from.
(cd plugins && cargo build --target wasm32-wasip1 --locked --quiet -p test-kitchen-sink)

if [ "${WASMGATE_SKIP_ASSEMBLYSCRIPT:-}" != 1 ]; then
  echo "==> building the AssemblyScript test plugin"
  bash plugins/test-assemblyscript/build.sh >/dev/null
fi
