#!/usr/bin/env bash
# Builds build/plugin.wasm from assembly/index.ts with the pinned AssemblyScript toolchain.
# Note: asc prints one AS201 warning (usize->u32 toString) from the SDK's own sources; harmless.
set -euo pipefail
cd "$(dirname "$0")"
# npm ci wipes node_modules; only run it when the lockfile changed since the last install.
if ! cmp -s package-lock.json node_modules/.wasmgate-installed-lock 2>/dev/null; then
  npm ci --no-audit --no-fund
  cp package-lock.json node_modules/.wasmgate-installed-lock
fi
npm run asbuild
