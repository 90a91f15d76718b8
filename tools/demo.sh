#!/usr/bin/env bash
# The main job, run by `./ds demo` after the build: show what this node has, then run the
# bundled model on a local three-process cluster (tools/demo-cluster.sh). Everything printed
# comes from the running programs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DSCTL=$ROOT/build/client/dsctl
PROMPT=${1:-"The meaning of life is"}

echo "== dsd demo =="
echo "-- devices on this node (dsctl devices) --"
"$DSCTL" devices --state-dir "$ROOT/build/state"
exec "$ROOT/tools/demo-cluster.sh" "$PROMPT"
