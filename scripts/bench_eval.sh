#!/usr/bin/env bash
# Times `clipmask eval` on 10,000 generated 500x375 label PNGs (ground truth + prediction) and
# prints JSON (seconds, masks/s). The masks are kept in $BENCH_EVAL_DIR and reused next time.
# Called by `make bench`; EVAL_BENCH_COUNT / RAYON_NUM_THREADS override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${BENCH_EVAL_DIR:-bench-out/eval}
count=${EVAL_BENCH_COUNT:-10000}
cargo build --release --quiet --examples
target/release/examples/eval_bench --dir "$dir" --count "$count" --width 500 --height 375 --repeat 2
