#!/usr/bin/env bash
# Builds the extension and installs it into the Postgres that PG_CONFIG names (system Postgres 15 by default).
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
sudo_flag=()
[ "$(id -u)" -eq 0 ] || [ -w "$("$PG_CONFIG" --pkglibdir)" ] || sudo_flag=(--sudo)
log=$(mktemp)
cargo pgrx install --pg-config "$PG_CONFIG" "${sudo_flag[@]}" "$@" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
rm -f "$log"
# Scripts of released versions, so that older versions can be installed and upgraded from.
extension_dir="$("$PG_CONFIG" --sharedir)/extension"
if [ ${#sudo_flag[@]} -eq 0 ]; then cp sql/released/*.sql "$extension_dir/"; else sudo cp sql/released/*.sql "$extension_dir/"; fi
echo "[install] sync_ext installed into $("$PG_CONFIG" --sharedir)/extension" >&2
