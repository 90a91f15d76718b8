#!/usr/bin/env bash
# bench_cluster.sh — in one run, on this machine:
#  1. tokens/s of an N-process cluster (coordinator + N-1 workers on loopback) against the
#     single-process engine (`dsctl generate --local`), same model, same tokens, and the ratio;
#  2. the per-layer routing overhead of the cluster ((cluster s/token - local s/token) / layers)
#     against a raw ZeroMQ round trip of one activation row on the same loopback link;
#  3. aggregate tokens/s of 4 concurrent jobs with 1 micro-batch in flight against 2 (the
#     scheduler splits the jobs so one micro-batch computes while the other crosses a link).
# usage: DS_BUILD=build DS_ROOT=. bench/bench_cluster.sh [MODEL_DIR] [WORKERS] [TOKENS]
set -u
here=$(cd "$(dirname "$0")" && pwd)
: "${DS_ROOT:=$(cd "$here/.." && pwd)}"
: "${DS_BUILD:=$DS_ROOT/build}"
export DS_ROOT DS_BUILD
. "$DS_ROOT/tests/cluster/lib.sh"
trap cluster_cleanup EXIT
model=${1:-$DS_ROOT/tests/data/ref/v3_bf16}
[ -f "$DS_ROOT/models/tiny/config.json" ] && [ -z "${1:-}" ] && model=$DS_ROOT/models/tiny
workers=${2:-2}
ntok=${3:-48}
maxpos=$(grep -o '"max_position_embeddings": *[0-9]*' "$model/config.json" | grep -o '[0-9]*$')
[ $((ntok + 8)) -gt "$maxpos" ] && ntok=$((maxpos - 8)) # prompt + tokens must fit the context
layers=$(grep -o '"num_hidden_layers": *[0-9]*' "$model/config.json" | grep -o '[0-9]*$')
hidden=$(grep -o '"hidden_size": *[0-9]*' "$model/config.json" | grep -o '[0-9]*$')
prompt=5,6,7

# Each side is timed as (run of ntok+1 tokens) - (run of 1 token): process start, model
# open and prefill cancel out, leaving ntok decode steps.
now() { date +%s.%N; }
"$DSCTL" generate --local --model "$model" --tokens $prompt --max-tokens 1 --threads 1 >/dev/null # page-in
a=$(now); "$DSCTL" generate --local --model "$model" --tokens $prompt --max-tokens 1 --threads 1 >/dev/null; b=$(now)
local_out=$("$DSCTL" generate --local --model "$model" --tokens $prompt --max-tokens $((ntok + 1)) --threads 1 | tail -n1)
c=$(now)
t0=0; t1=$(echo "($c - $b) - ($b - $a)" | bc)
cluster_start "$model" "$workers" || exit 1
"$DSCTL" submit --tokens $prompt --max-tokens 2 >/dev/null # warm-up (connections, page-in)
a=$(now); "$DSCTL" submit --tokens $prompt --max-tokens 1 >/dev/null; b=$(now)
cluster_out=$("$DSCTL" submit --tokens $prompt --max-tokens $((ntok + 1)) | tail -n1)
c=$(now)
t2=0; t3=$(echo "($c - $b) - ($b - $a)" | bc)
raw=$("$DS_BUILD/bench/bench_cluster_rtt" 1 "$hidden" 2000 | awk '{print $2}')
# routing overhead as the coordinator measured it: per request, round trip minus the host's
# compute time, summed over every link, per step and layer
# (the attention hosts time every dispatch; the workers report theirs to the coordinator)
sleep 0.5 # one heartbeat: the workers' latest figures reach the coordinator
xfer=$("$DSCTL" placement --json | jq '[.measured.links[].measured_transfer_s] | add // 0')
steps=$("$DSCTL" jobs --json | jq .steps)
# concurrent jobs: N micro-batches in flight; total tokens / wall time
conc() { # prints tokens/s for 4 concurrent jobs of ntok tokens
    local a b i pids=()
    a=$(now)
    for i in 1 2 3 4; do
        "$DSCTL" submit --tokens "$i,$prompt" --max-tokens "$ntok" >/dev/null &
        pids+=($!)
    done
    wait "${pids[@]}" # not a bare `wait`: that would wait for the daemons too
    b=$(now)
    echo "4 * $ntok / ($b - $a)" | bc -l
}
mb2=$(conc)
cluster_stop
cluster_start "$model" "$workers" --micro_batches=1 || exit 1
"$DSCTL" submit --tokens $prompt --max-tokens 2 >/dev/null
mb1=$(conc)
[ "$local_out" = "$cluster_out" ] && same=yes || same=NO
awk -v l="$(echo "$t1 - $t0" | bc)" -v c="$(echo "$t3 - $t2" | bc)" -v n="$ntok" \
    -v L="$layers" -v raw="$raw" -v w="$workers" -v same="$same" -v xfer="$xfer" \
    -v steps="$steps" -v mb1="$mb1" -v mb2="$mb2" 'BEGIN {
    printf "model layers %d, %d decode steps (startup and prefill subtracted), greedy, 1 compute thread per process\n", L, n
    printf "%-44s %10.1f tok/s\n", "single-process engine (dsctl generate --local)", n / l
    printf "%-44s %10.1f tok/s\n", sprintf("cluster: coordinator + %d workers (loopback)", w), n / c
    printf "%-44s %10.3f\n", "ratio cluster / single-process", (n / c) / (n / l)
    over = xfer / steps / L * 1e6
    printf "%-44s %10.1f us\n", "per-layer routing overhead (measured)", over
    printf "%-44s %10.1f us\n", "per-layer time difference cluster - local", (c / n - l / n) / L * 1e6
    printf "%-44s %10.1f us\n", "raw ZeroMQ round trip, 1 row, same link", raw
    printf "%-44s %10.2f\n", "ratio overhead / raw round trip", over / raw
    printf "%-44s %10s\n", "tokens identical", same
    printf "%-44s %10.1f tok/s\n", "4 concurrent jobs, 1 micro-batch in flight", mb1
    printf "%-44s %10.1f tok/s\n", "4 concurrent jobs, 2 micro-batches in flight", mb2
    printf "%-44s %10.3f\n", "ratio 2 / 1 micro-batches", mb2 / mb1
}'
