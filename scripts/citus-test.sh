#!/usr/bin/env bash
# The Citus suite: sync_ext on a coordinator and two workers on free loopback ports, started and stopped by
# the suite itself (pgrx-tests/tests/citus.rs): the README's Citus section run as written, then every sync
# function through the coordinator, and a distributed install updated from 0.1.0.
#
# Needs an installed Citus for the Postgres that PG_CONFIG names (its library directory has citus.so).
# Citus is not packaged for Debian here, so build it from its source first (13.2.x supports Postgres 15;
# Postgres 15.20's have_createdb_privilege() declaration clashes with Citus's own static copy in
# src/include/pg_version_compat.h, which needs a rename), e.g.:
#   ./configure PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config && make -j2 && make install
# Not part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
export PG_CONFIG
if [ ! -f "$("$PG_CONFIG" --pkglibdir)/citus.so" ]; then
  echo "[citus-test] no citus.so in $("$PG_CONFIG" --pkglibdir): install Citus for this Postgres first (see the comment at the top)" >&2
  exit 1
fi
bash scripts/setup.sh
bash scripts/install.sh "$@"
cargo test -p sync_ext_pgrx_tests --features citus --test citus -- --test-threads=1 --nocapture
