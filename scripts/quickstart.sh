#!/usr/bin/env bash
# The quickstart: builds Wasmgate and the bundled add-header plugin, then runs a sample request
# through the plugin in-process and shows what it changed. Until the gateway lands, this is the
# main job; extra arguments go to `wasmgate plugin run`.
set -euo pipefail
cd "$(dirname "$0")/.."

WASMGATE_SKIP_ASSEMBLYSCRIPT=1 bash scripts/build-plugins.sh
cargo build --release --locked --quiet -p wasmgate

exec target/release/wasmgate plugin run plugins/target/wasm32-wasip1/release/add_header.wasm \
  --config '{"name": "hello", "value": "world", "side": "both"}' \
  --path /productpage -H 'user-agent: quickstart' "$@"
