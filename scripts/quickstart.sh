#!/usr/bin/env bash
# The quickstart: builds Wasmgate and the basic-auth plugin, then runs the built-in quickstart
# gateway on 127.0.0.1:8080 (admin on 127.0.0.1:15000): basic-auth guards /productpage of a demo
# upstream, as in Istio's example. Try, from another terminal:
#   curl -u ok:test localhost:8080/productpage     # 200
#   curl -i localhost:8080/productpage             # 401
# Extra arguments go to `wasmgate run` (e.g. --listen 127.0.0.1:9090).
set -euo pipefail
cd "$(dirname "$0")/.."

WASMGATE_SKIP_ASSEMBLYSCRIPT=1 bash scripts/build-plugins.sh
cargo build --release --locked --quiet -p wasmgate

exec target/release/wasmgate run "$@"
