#!/usr/bin/env bash
# Instructions per request, with and without plugins/test-bench, counted by callgrind (repeatable
# on a busy machine, unlike req/s). Builds bench/driver (release) and runs it under callgrind twice
# per setup, with SMALL and LARGE request counts; the difference divided by (LARGE - SMALL) is the
# steady-state cost of one request, start-up and shutdown cancelled out. Prints it for the whole
# process (client and upstream included) and for the gateway's worker thread alone. The LARGE
# runs' profiles stay in $OUT (default target/bench-profile): `callgrind_annotate FILE`.
#
#   SMALL (default 300), LARGE (default 2300), OUT
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SMALL=${SMALL:-300}
LARGE=${LARGE:-2300}
OUT=${OUT:-$ROOT/target/bench-profile}
export CARGO_TARGET_DIR=$ROOT/target/bench-driver
(cd bench/driver && cargo build --release --offline --quiet)
DRIVER=$CARGO_TARGET_DIR/release/wasmgate-bench-driver
mkdir -p "$OUT"
# Once outside valgrind, so the compiled module is in the disk cache before counting.
PLUGIN=1 REQUESTS=10 WARMUP=0 "$DRIVER" >/dev/null 2>&1
for plugin in 0 1; do
  for n in "$SMALL" "$LARGE"; do
    rm -f "$OUT"/callgrind.plugin$plugin.n$n.*
    PLUGIN=$plugin REQUESTS=$n WARMUP=50 valgrind --tool=callgrind --separate-threads=yes \
      --callgrind-out-file="$OUT/callgrind.plugin$plugin.n$n.%p" "$DRIVER" >/dev/null 2>"$OUT/valgrind.log"
  done
done
python3 - "$OUT" "$SMALL" "$LARGE" <<'PY'
import glob, re, sys
out, small, large = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def totals(plugin, n):
    total, worker = 0, 0
    for f in glob.glob(f"{out}/callgrind.plugin{plugin}.n{n}.*-*"):
        text = open(f, errors="replace").read()
        m = re.search(r"^totals:\s+(\d+)", text, re.M) or re.search(r"^summary:\s+(\d+)", text, re.M)
        count = int(m.group(1)) if m else 0
        total += count
        if "proxy::handle" in text:
            worker = max(worker, count)
    return total, worker
def per_request(plugin):
    (t1, w1), (t2, w2) = totals(plugin, small), totals(plugin, large)
    return (t2 - t1) / (large - small), (w2 - w1) / (large - small)
base, plugin = per_request(0), per_request(1)
print(f"{'instructions/request':24}{'process':>12}{'worker':>12}")
print(f"{'Wasmgate':24}{base[0]:12.0f}{base[1]:12.0f}")
print(f"{'Wasmgate + test-bench':24}{plugin[0]:12.0f}{plugin[1]:12.0f}")
print(f"{'plugin cost':24}{plugin[0]-base[0]:12.0f}{plugin[1]-base[1]:12.0f}"
      f"   (worker +{100*(plugin[1]-base[1])/base[1]:.1f}%)")
PY
