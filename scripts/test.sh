#!/usr/bin/env bash
# Runs every test: the protocol and client crates (unit, property and doc tests), the in-database #[pg_test]s, and the
# end-to-end tests over real connections to throwaway clusters. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

# Every runner's output also goes to a log, so the run can end with one total.
results=$(mktemp)
cleanup() { rm -f "$results"; [ -z "${pgtest_dir:-}" ] || rm -rf "$pgtest_dir"; }
trap cleanup EXIT
counted() { "$@" 2>&1 | tee -a "$results"; }

echo "== protocol and client: unit tests, property tests, doctests"
counted cargo test -p sync_ext_protocol -p sync_ext_client

echo "== extension: in-database tests"
if [ "$(id -u)" -eq 0 ]; then
  # initdb refuses root: the test cluster runs as postgres, in a directory postgres owns.
  pgtest_dir=$(mktemp -d)
  chown postgres "$pgtest_dir"
  counted cargo pgrx test pg15 --runas postgres --pgdata "$pgtest_dir/data"
else
  counted cargo pgrx test pg15
fi

echo "== end-to-end tests"
bash scripts/install.sh
counted cargo test -p sync_ext_pgrx_tests

awk '/^test result:/ { passed += $4; failed += $6 } END { printf "all suites: %d passed, %d failed\n", passed, failed }' "$results"
