#!/usr/bin/env bash
# RUSTC_WRAPPER used by scripts/fuzz.sh: adds libFuzzer's coverage instrumentation (the flags
# `cargo fuzz build --sanitizer none` passes to every crate) to our crates and the fuzz targets
# only. Coverage of wasmtime and cranelift would steer the fuzzer toward engine internals it is not
# aimed at, bloat the corpus with their paths, and give libFuzzer more counters to scan on every
# run.
set -euo pipefail
rustc=$1
shift
crate=
previous=
for arg in "$@"; do
    if [ "$previous" = --crate-name ]; then
        crate=$arg
    fi
    previous=$arg
done
case "$crate" in
    wasmgate_* | header_pairs | host_calls)
        exec "$rustc" "$@" \
            -Cpasses=sancov-module \
            -Cllvm-args=-sanitizer-coverage-level=4 \
            -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
            -Cllvm-args=-sanitizer-coverage-pc-table \
            -Cllvm-args=-sanitizer-coverage-trace-compares \
            -Cllvm-args=-sanitizer-coverage-stack-depth \
            -Cllvm-args=-simplifycfg-branch-fold-threshold=0
        ;;
    *)
        exec "$rustc" "$@"
        ;;
esac
