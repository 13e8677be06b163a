#!/usr/bin/env bash
# The main job: builds and installs sync_ext, starts a throwaway cluster, and walks through real sync.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install.sh
cargo run --quiet -p sync_ext_pgrx_tests --bin demo
