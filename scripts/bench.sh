#!/usr/bin/env bash
# The benchmark: sync_ext against plain SQL on the same schema, on a throwaway cluster of its own.
# Installs a release build of the extension, runs the workloads (about ten minutes) and writes BENCHMARKS.md,
# with the performance targets met and missed at the top (missed ones are also printed to stderr at the end).
# SYNC_EXT_BENCH_ONLY=push,growth,big-tenant,concurrency,bound,capture,pull,idle-pull,storage,scale,memory,scopes runs
# some sections only (the file then holds only those); `citus` (sync_ext through a Citus coordinator against one node)
# runs only when named, and needs Citus installed for PG_CONFIG (see scripts/citus-test.sh); SYNC_EXT_BENCH_QUICK=1 shrinks most sizes tenfold for
# development runs (the figures are then not comparable). The concurrency section starts a second cluster with
# fsync on.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install.sh --release
cargo run --quiet --release -p sync_ext_pgrx_tests --bin bench -- "${1:-BENCHMARKS.md}"
