#!/usr/bin/env bash
# Chunked prefill (label `cluster`): a coordinator and 2 workers with max_rows_per_step = 3,
# so a micro-batch carries at most 3 rows and every prompt longer than that is fed over
# several steps (and 4 concurrent prompts share those 3 rows per step). Each output must be
# token-identical to `dsctl generate --local`, which feeds the whole prompt at once.
set -u
. "$(dirname "$0")/lib.sh"
trap cluster_cleanup EXIT
fail=0

model="$DS_ROOT/tests/data/ref/v3_bf16"
# round-robin: attention and experts on every node, so the chunks cross the links
cluster_start "$model" 2 --plan_strategy=round-robin --max_rows_per_step=3 ||
    { cluster_stop; exit 1; }
PROMPTS=("10,20,30,40,50,60,70,80,90,100,110" "5,6,7,8" "1" "200,3,3,3,3,3,3")
for p in "${PROMPTS[@]}"; do
    want=$("$DSCTL" generate --local --model "$model" --tokens "$p" --max-tokens 8 --threads 1 | tail -n1)
    got=$(timeout 60 "$DSCTL" submit --tokens "$p" --max-tokens 8 | tail -n1)
    if [ "$want" != "$got" ] || [ -z "$want" ]; then
        echo "FAIL prompt $p: local '$want' cluster '$got'"
        fail=1
    else
        echo "ok   prompt $p: $got"
    fi
done
# one job at a time, one micro-batch each: ceil(prompt / 3) prefill steps, then 7 decode
# steps (the first token comes with the last chunk): 4+7, 2+7, 1+7, 3+7; unchunked it is 8 each
steps=$("$DSCTL" jobs --json | jq '.steps')
if [ "$steps" = 38 ]; then
    echo "ok   38 scheduler steps for the 4 jobs (32 without chunks)"
else
    echo "FAIL: $steps scheduler steps, want 38 (prompts in chunks of 3 rows)"
    fail=1
fi
# all at once: 25 prompt rows over steps of 3 rows, prefill chunks beside decode rows
declare -A want_c=()
pids=()
for i in "${!PROMPTS[@]}"; do
    want_c[$i]=$("$DSCTL" generate --local --model "$model" --tokens "${PROMPTS[$i]}" --max-tokens 10 --threads 1 | tail -n1)
    (timeout 60 "$DSCTL" submit --tokens "${PROMPTS[$i]}" --max-tokens 10 | tail -n1 >"$CLUSTER_DIR/conc.$i") &
    pids+=($!)
done
wait "${pids[@]}"
for i in "${!PROMPTS[@]}"; do
    got=$(cat "$CLUSTER_DIR/conc.$i")
    if [ "${want_c[$i]}" != "$got" ]; then
        echo "FAIL concurrent job $i: local '${want_c[$i]}' cluster '$got'"
        fail=1
    else
        echo "ok   concurrent job $i: $got"
    fi
done
cluster_stop
[ $fail -eq 0 ] && echo "PASS" || { tail -n 30 "$CLUSTER_DIR"/*.log; }
exit $fail
