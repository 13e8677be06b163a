#!/usr/bin/env bash
# Installs what building and testing sync_ext needs, skipping whatever is already there:
# Debian packages (Postgres 15 server headers, clang for bindgen, sudo for pgrx installs),
# cargo-pgrx pinned to the pgrx version in Cargo.toml, and `cargo pgrx init` against the system pg_config.
set -euo pipefail

PGRX_VERSION=0.18.0
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
APT_PACKAGES=(postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo pgbouncer)

say() { printf '[setup] %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
  say "installing cargo-pgrx $PGRX_VERSION (takes a few minutes, once)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
fi

PGRX_HOME=${PGRX_HOME:-$HOME/.pgrx}
if ! grep -qs "^pg15 *= *\"$PG_CONFIG\"" "$PGRX_HOME/config.toml"; then
  say "pointing pgrx at $PG_CONFIG"
  cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi

# pgrx installs the extension into the system Postgres directories; the test user must be able to read them.
id postgres >/dev/null 2>&1 || { say "the postgres OS user is missing"; exit 1; }
say "ready: $(cargo pgrx --version), $("$PG_CONFIG" --version)"
