#!/usr/bin/env bash
# The main job, run by `./ds demo` after the build: show what this node has, then run the
# bundled model. Each step runs only what is really built; nothing here prints canned output.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/build
DSCTL=$BIN/client/dsctl
PROMPT=${1:-"The meaning of life is"}

has_cmd() { "$DSCTL" --help 2>/dev/null | grep -q "^  $1 "; }

echo "== dsd demo =="
if has_cmd devices; then
  echo "-- devices on this node (dsctl devices) --"
  "$DSCTL" devices --state-dir "$ROOT/build/state"
fi
if [ -x "$ROOT/tests/cluster/demo-cluster.sh" ] && [ -x "$BIN/daemon/dsd" ]; then
  exec "$ROOT/tests/cluster/demo-cluster.sh" "$PROMPT"
fi
if has_cmd generate && [ -f "$ROOT/models/tiny/config.json" ]; then
  echo "-- single-process generation (dsctl generate --local) --"
  "$DSCTL" generate --local --model "$ROOT/models/tiny" --max-tokens 48 --greedy "$PROMPT"
fi
