#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ and runs each for SECONDS (default 20) from its committed corpus
# (fuzz/corpus/TARGET, read only: new inputs go to a temporary folder). Fails on any crash, panic,
# timeout or out-of-memory, leaving the input in fuzz/artifacts/TARGET/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      targets: header_pairs host_calls (default: both)
#
# SECONDS 0 only builds.
#
# How this builds on stable Rust, without cargo-fuzz: `cargo fuzz build --sanitizer none` works on
# stable (only the sanitizers need nightly, so no RUSTC_BOOTSTRAP), but it builds every crate,
# wasmtime and cranelift included, instrumented at opt-level 3 in one codegen unit: 10 CPU-minutes
# for a cold build here, after 2 minutes of `cargo install cargo-fuzz` on a clean machine. So this
# script builds the same binaries with plain cargo: libfuzzer-sys supplies libFuzzer and `main`,
# fuzz/instrument-rustc.sh adds cargo-fuzz's coverage flags to our crates and the targets only, and
# the `fuzz` profile in fuzz/Cargo.toml leaves the dependencies unoptimised. A cold build is 4
# CPU-minutes (2 minutes on two idle cores; at opt-level 1 it was 11 CPU-minutes). Unoptimised
# wasmtime slows the runs, but host_calls still runs 300 to 500 inputs a second. `--cfg fuzzing`
# is what cargo-fuzz sets too; it also keeps these artefacts apart from any plain build of fuzz/.
# `cargo fuzz run TARGET --sanitizer none` still works in fuzz/ for local runs (fuzz/README.md).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-20}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(header_pairs host_calls)
fi

# A clean clone never reuses incremental state; writing it costs disk and time.
export CARGO_INCREMENTAL=0
# A panic in a target prints where it happened, for the CI log.
export RUST_BACKTRACE=1

cargo fmt --check

# No --locked: fuzz/ has its own lock file, and a dependency added to a crate must not fail this
# step before the lock file catches up (cargo adds it; pinned versions stay).
RUSTFLAGS="--cfg fuzzing" RUSTC_WRAPPER="$PWD/instrument-rustc.sh" \
    cargo build --profile fuzz --bins

bin_dir="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
if [ "$seconds" -eq 0 ]; then
    exit 0
fi
for target in "${targets[@]}"; do
    case "$target" in
        # Runs are sequences of calls: allow long inputs from the start instead of growing to them.
        host_calls) options=(-max_len=1024 -len_control=0) ;;
        header_pairs) options=() ;;
        *)
            echo "unknown fuzz target $target" >&2
            exit 2
            ;;
    esac
    new_inputs=$(mktemp -d)
    artifacts="artifacts/$target"
    mkdir -p "$artifacts" "corpus/$target"
    echo "=== fuzzing $target for ${seconds}s"
    status=0
    "$bin_dir/$target" "${options[@]}" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_funcs=0 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" "$new_inputs" "corpus/$target" ||
        status=$?
    rm -rf "$new_inputs"
    if [ "$status" -ne 0 ]; then
        echo "fuzz target $target failed (exit $status); the input is in fuzz/$artifacts/." >&2
        echo "Reproduce: $bin_dir/$target fuzz/$artifacts/FILE (WASMGATE_FUZZ_TRACE=1 to" \
            "print each call host_calls makes)" >&2
        exit "$status"
    fi
done
