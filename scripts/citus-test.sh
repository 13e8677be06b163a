#!/usr/bin/env bash
# The Citus suite: sync_ext on a coordinator and two workers on free loopback ports, started and stopped by
# the suite itself (pgrx-tests/tests/citus.rs): the README's Citus section run as written, then every sync
# function through the coordinator, and a distributed install updated from 0.1.0.
#
# Needs an installed Citus for the Postgres that PG_CONFIG names (its library directory has citus.so).
# Citus is not packaged for Debian here, so build it from its source first (tested with v13.2.2; Postgres
# 15.20's headers declare have_createdb_privilege(), which clashes with Citus's own static copy: rename it,
# e.g. to citus_have_createdb_privilege, in src/include/pg_version_compat.h (the #define and the static
# function) and at its one call in src/backend/distributed/commands/serialize_distributed_ddls.c). Build
# needs liblz4-dev libzstd-dev libkrb5-dev libselinux1-dev libpam0g-dev libcurl4-openssl-dev, then:
#   ./configure PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config --without-libcurl && make -j2 && make install
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
