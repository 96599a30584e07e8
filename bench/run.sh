#!/usr/bin/env bash
# Wasmgate against Envoy on this machine, in one run: nginx as the upstream, Envoy (1 worker, V8) and
# Wasmgate (1 worker) side by side, each without and with the same plugin (plugins/test-bench: reads
# a header, sets a request header, increments a counter, sets a response header). wrk drives every
# target in alternating rounds; the table gives req/s, p99 latency and RSS, and the ratios.
# Measures only: nothing here asserts a number. Record results in bench/RESULTS.md.
#
#   ROUNDS (default 3), DURATION (seconds per run, default 10), CONNECTIONS (default 50)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-50}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk; then
  echo "==> installing nginx and wrk (Debian packages)" >&2
  apt-get update -qq >/dev/null && apt-get install -y -qq nginx wrk >/dev/null
fi
ENVOY=$(bash scripts/install-envoy.sh | tail -n 1)
WASMGATE_SKIP_ASSEMBLYSCRIPT=1 bash scripts/build-plugins.sh >&2
cargo build --release --locked --quiet -p wasmgate
PLUGIN="$ROOT/plugins/target/wasm32-wasip1/release/test_bench.wasm"

WORK=$(mktemp -d)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UPSTREAM=$(free_port); ENVOY_PLAIN=$(free_port); ENVOY_WASM=$(free_port); ENVOY_ADMIN=$(free_port)
WG_PLAIN=$(free_port); WG_WASM=$(free_port); WG_ADMIN=$(free_port)

cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK; uwsgi_temp_path $WORK; scgi_temp_path $WORK;
  server { listen 127.0.0.1:$UPSTREAM; keepalive_requests 1000000; location / { return 200 "hello from nginx\n"; } }
}
CONF
nginx -c "$WORK/nginx.conf" -g 'daemon off;' & PIDS+=($!)

listener() { # name port with_plugin
  local filters=""
  if [ "$3" = yes ]; then
    filters="
          - name: envoy.filters.http.wasm
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: bench
                vm_config:
                  runtime: envoy.wasm.runtime.v8
                  code: { local: { filename: $PLUGIN } }"
  fi
  cat <<CONF
  - name: $1
    address: { socket_address: { address: 127.0.0.1, port_value: $2 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          route_config: { virtual_hosts: [ { name: all, domains: ["*"], routes: [ { match: { prefix: "/" }, route: { cluster: nginx } } ] } ] }
          http_filters:$filters
          - name: envoy.filters.http.router
            typed_config: { '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
CONF
}
{
  echo "admin: { address: { socket_address: { address: 127.0.0.1, port_value: $ENVOY_ADMIN } } }"
  echo "static_resources:"
  echo "  listeners:"
  listener plain "$ENVOY_PLAIN" no
  listener wasm "$ENVOY_WASM" yes
  cat <<CONF
  clusters:
  - name: nginx
    type: STATIC
    load_assignment: { cluster_name: nginx, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $UPSTREAM } } } } ] } ] }
CONF
} > "$WORK/envoy.yaml"
"$ENVOY" -c "$WORK/envoy.yaml" --concurrency 1 --log-level warn > "$WORK/envoy.log" 2>&1 & PIDS+=($!); ENVOY_PID=$!

cat > "$WORK/wasmgate.yaml" <<CONF
workers: 1
admin: 127.0.0.1:$WG_ADMIN
listeners:
  - name: plain
    address: 127.0.0.1:$WG_PLAIN
    routes: [ { match: { prefix: / }, cluster: nginx } ]
  - name: wasm
    address: 127.0.0.1:$WG_WASM
    http_filters:
      - name: bench
        vm_config: { code: { local: { filename: $PLUGIN } } }
    routes: [ { match: { prefix: / }, cluster: nginx } ]
clusters:
  - name: nginx
    endpoints: [127.0.0.1:$UPSTREAM]
CONF
WASMGATE_LOG=warn target/release/wasmgate run --config "$WORK/wasmgate.yaml" > "$WORK/wasmgate.log" 2>&1 & PIDS+=($!); WG_PID=$!

ready() { for _ in $(seq 1 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "not ready: $1" >&2; exit 1; }
ready "http://127.0.0.1:$UPSTREAM/"; ready "http://127.0.0.1:$ENVOY_ADMIN/ready"; ready "http://127.0.0.1:$WG_ADMIN/ready"
for port in $ENVOY_PLAIN $ENVOY_WASM $WG_PLAIN $WG_WASM; do ready "http://127.0.0.1:$port/"; done
curl -fsI "http://127.0.0.1:$ENVOY_WASM/" | grep -qi '^x-bench: 1' || { echo "Envoy did not run the plugin" >&2; exit 1; }
curl -fsI "http://127.0.0.1:$WG_WASM/" | grep -qi '^x-bench: 1' || { echo "Wasmgate did not run the plugin" >&2; exit 1; }

declare -A RPS P99
run() { # label port
  local out; out=$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:$2/")
  local rps p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  RPS[$1]="${RPS[$1]:-} $rps"; P99[$1]="${P99[$1]:-} $p99"
  echo "  $1: $rps req/s, p99 $p99" >&2
}
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  run envoy "$ENVOY_PLAIN"; run wasmgate "$WG_PLAIN"; run envoy+wasm "$ENVOY_WASM"; run wasmgate+wasm "$WG_WASM"
done
rss() { awk '/VmRSS/ {print $2/1024 " MiB"}' "/proc/$1/status"; }

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
to_ms() { tr ' ' '\n' | grep -v '^$' | sed -E 's/([0-9.]+)us$/echo "\1\/1000" | bc -l/; s/([0-9.]+)ms$/echo \1/; s/([0-9.]+)s$/echo "\1*1000" | bc -l/' | sh | median; }
echo
echo "$(date -u +%Y-%m-%d) $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo); $ROUNDS rounds x ${DURATION}s, $CONNECTIONS connections, medians"
printf '%-15s %12s %10s %10s\n' target "req/s" "p99 ms" RSS
for t in envoy wasmgate envoy+wasm wasmgate+wasm; do
  pid=$ENVOY_PID; [[ $t == wasmgate* ]] && pid=$WG_PID
  printf '%-15s %12s %10s %10s\n' "$t" "$(median <<<"${RPS[$t]}")" "$(to_ms <<<"${P99[$t]}")" "$(rss $pid)"
done
e=$(median <<<"${RPS[envoy+wasm]}"); w=$(median <<<"${RPS[wasmgate+wasm]}"); wp=$(median <<<"${RPS[wasmgate]}"); ep=$(median <<<"${RPS[envoy]}")
echo "with the plugin, Wasmgate/Envoy req/s: $(echo "scale=2; $w/$e" | bc)"
echo "plugin cost: Envoy $(echo "scale=1; 100-100*$e/$ep" | bc)%, Wasmgate $(echo "scale=1; 100-100*$w/$wp" | bc)%"
