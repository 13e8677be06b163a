#!/usr/bin/env bash
# The benchmark: sync_ext against plain SQL on the same schema, on a throwaway cluster of its own.
# Installs a release build of the extension, runs the workloads (a few minutes) and writes BENCHMARKS.md.
# SYNC_EXT_BENCH_ONLY=push,pull,scale,memory runs some sections only (the file then holds only those).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install.sh --release
cargo run --quiet --release -p sync_ext_pgrx_tests --bin bench -- "${1:-BENCHMARKS.md}"
