#!/usr/bin/env bash
# The main job: a local dsd cluster (a coordinator and two workers, separate processes on
# loopback) serving the bundled model. Shows the placement the solver chose, then generates
# text on the cluster and, for comparison, in-process. Everything printed comes from the
# running programs.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export DS_ROOT=$ROOT DS_BUILD=${DS_BUILD:-$ROOT/build}
PROMPT=${1:-"The meaning of life is"}
MODEL=$ROOT/models/tiny
. "$ROOT/tests/cluster/lib.sh"
trap cluster_cleanup EXIT

# Cap each node's memory below the model's size so the plan has to spread the model over the
# three processes, as it would over small boxes.
bytes=$(cat "$MODEL"/*.safetensors | wc -c)
printf 'device.cpu0.memory_cap = %d\n' $((bytes * 45 / 100)) >"$CLUSTER_DIR/devices.conf"

echo "-- starting coordinator + 2 workers on loopback (models/tiny) --"
cluster_start "$MODEL" 2 --devices_config="$CLUSTER_DIR/devices.conf" --plan_context=256 || exit 1
echo "-- dsctl status --"
"$DSCTL" status
echo "-- dsctl placement --"
"$DSCTL" placement
"$DSCTL" placement --json | grep -m2 -oE '"(strategy|solver)": *"[^"]*"' | tr '\n' ' '
echo "(which placement strategy and solver made this plan)"
echo "-- dsctl generate (on the cluster), prompt: $PROMPT --"
"$DSCTL" generate --model "$MODEL" --max-tokens 48 --greedy "$PROMPT"
echo "-- dsctl generate --local (the same model in one process, for comparison) --"
"$DSCTL" generate --local --model "$MODEL" --max-tokens 48 --greedy "$PROMPT"
