#!/usr/bin/env bash
# Runs every test: the protocol's unit and property tests, the in-database #[pg_test]s, and the
# end-to-end tests over real connections to throwaway clusters. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

echo "== protocol: unit and property tests"
cargo test -p sync_ext_protocol

echo "== extension: in-database tests"
if [ "$(id -u)" -eq 0 ]; then
  # initdb refuses root: the test cluster runs as postgres, in a directory postgres owns.
  pgtest_dir=$(mktemp -d)
  trap 'rm -rf "$pgtest_dir"' EXIT
  chown postgres "$pgtest_dir"
  cargo pgrx test pg15 --runas postgres --pgdata "$pgtest_dir/data"
else
  cargo pgrx test pg15
fi

echo "== end-to-end tests"
bash scripts/install.sh
cargo test -p sync_ext_pgrx_tests
