#!/usr/bin/env bash
# The KTransformers layout on a cluster (labels `cluster`, `opencl`): the coordinator offers
# only its OpenCL device (PoCL here: cpu0 excluded in its devices config) and the plan is pinned
# (plan_pin) so that every attention layer with its KV cache, router and dense/shared FFN, the
# embedding and the head run on coord/opencl0, and the routed experts on the CPU engines of
# two workers (alternating layers). Checks, per model (models/tiny and two reference
# checkpoints): the plan names opencl0 for attention/embed/head, the coordinator uploaded them
# to the device, the output is token-identical to `dsctl generate --local` on the CPU, and
# the measured per-device compute shows the attention work on coord/opencl0 beside the solver's
# prediction (printed: measured / predicted per device). Skips (77) without an OpenCL device.
set -u
. "$(dirname "$0")/lib.sh"
trap cluster_cleanup EXIT
need_jq
"$DSCTL" devices --json 2>/dev/null | jq -e '[.node.devices[] | select(.name == "opencl0")] | length > 0' \
    >/dev/null || { echo "SKIP: no OpenCL device on this machine"; exit 77; }
fail=0
printf 'device.cpu0.exclude = true\n' >"$CLUSTER_DIR/coord.conf"

run_model() { # model dir, prompts...
    local M=$1
    shift
    local L first pins l w
    L=$(jq .num_hidden_layers "$M/config.json")
    first=$(jq '.first_k_dense_replace // 0' "$M/config.json")
    pins="attn[*]=coord/opencl0,embed=coord/opencl0,head=coord/opencl0"
    for ((l = first; l < L; l++)); do
        w=$((1 + (l - first) % 2))
        pins="$pins,expert[$l][*]=w$w/cpu0"
    done
    # the options after the model go to every node; the workers' own (later, so they win)
    # take the OpenCL device and the devices config back: they offer cpu0 only
    CLUSTER_WORKER_ARGS[1]="--discover_opencl=false --devices_config="
    CLUSTER_WORKER_ARGS[2]="--discover_opencl=false --devices_config="
    cluster_start "$M" 2 --discover_opencl=true --devices_config="$CLUSTER_DIR/coord.conf" \
        --plan_pin="$pins" --plan_context=64 || { tail -n 20 "$CLUSTER_DIR"/*.log; return 1; }
    local pl
    pl=$("$DSCTL" placement --json)
    local on_dev
    on_dev=$(jq '[.plan.devices // {} | to_entries[] | select(.value == "opencl0")
                  | select(.key | test("^(attn|embed|head)"))] | length' <<<"$pl")
    echo "$(basename "$M"): plan puts $on_dev of $((L + 2)) attention/embed/head units on coord/opencl0"
    [ "$on_dev" -eq $((L + 2)) ] || { echo "FAIL: attention/embed/head not all on opencl0"; fail=1; }
    local bad_exp
    bad_exp=$(jq '[.plan.units | to_entries[] | select(.key | startswith("expert"))
                   | select(.value == "coord")] | length' <<<"$pl")
    [ "$bad_exp" -eq 0 ] || { echo "FAIL: $bad_exp experts on the coordinator"; fail=1; }
    grep -q "attention/FFN/embed/head weights on opencl0" "$CLUSTER_DIR/coord.log" ||
        { echo "FAIL: the coordinator did not upload attention to opencl0"; fail=1; }
    "$DSCTL" placement | grep -Eq '^0 +coord/opencl0 ' ||
        { echo "FAIL: dsctl placement does not show attn[0] on coord/opencl0"; fail=1; }
    local p opts want got
    for p in "$@"; do
        for opts in "--max-tokens 12" "--max-tokens 8 --temperature 0.8 --top-k 20 --seed 7"; do
            # shellcheck disable=SC2086
            want=$("$DSCTL" generate --local --model "$M" --tokens "$p" $opts --threads 1 | tail -n1)
            # shellcheck disable=SC2086
            got=$(timeout 60 "$DSCTL" submit --tokens "$p" $opts | tail -n1)
            if [ "$want" = "$got" ] && [ -n "$want" ]; then echo "ok   $p $opts: $got"; else
                echo "FAIL $p $opts: local '$want' cluster '$got'"; fail=1; fi
        done
    done
    # two jobs at once: batched rows of two sequences through the device caches
    local a b wa wb
    wa=$("$DSCTL" generate --local --model "$M" --tokens 3,4,5 --max-tokens 10 --threads 1 | tail -n1)
    wb=$("$DSCTL" generate --local --model "$M" --tokens 9,8,7,6 --max-tokens 10 --threads 1 | tail -n1)
    timeout 60 "$DSCTL" submit --tokens 3,4,5 --max-tokens 10 >"$CLUSTER_DIR/a.out" &
    a=$!
    timeout 60 "$DSCTL" submit --tokens 9,8,7,6 --max-tokens 10 >"$CLUSTER_DIR/b.out" &
    b=$!
    wait $a
    wait $b
    if [ "$(tail -n1 "$CLUSTER_DIR/a.out")" = "$wa" ] && [ "$(tail -n1 "$CLUSTER_DIR/b.out")" = "$wb" ]; then
        echo "ok   two concurrent jobs"; else echo "FAIL: concurrent jobs differ"; fail=1; fi
    # measured per device: the coordinator's attention work on opencl0, beside the prediction
    local table steps=0
    for _ in $(seq 40); do # the nodes publish their figures at most every 100 ms
        table=$("$DSCTL" placement)
        steps=$(echo "$table" | sed -n 's/.*measured over \([0-9]*\) steps.*/\1/p')
        # and the workers' figures, which come with their heartbeats
        if [ "${steps:-0}" -ge 20 ] && echo "$table" | awk '$1 == "w1/cpu0" && $4 ~ /^[0-9.]+$/ { f = 1 }
                END { exit !f }'; then break; fi
        sleep 0.1
    done
    echo "$table" | sed -n '/PREDICTED VS MEASURED/,/NODE PAIR/p'
    local ms
    ms=$(echo "$table" | awk '$1 == "coord/opencl0" { print $4 }')
    awk -v m="${ms:-0}" 'BEGIN { exit !(m > 0) }' ||
        { echo "FAIL: no measured compute on coord/opencl0"; fail=1; }
    echo "$table" | awk '/PREDICTED VS MEASURED/ { on = 1 } /NODE PAIR/ { on = 0 }
        on && $2 ~ /^[0-9.]+$/ && $3 == "ms" && $4 ~ /^[0-9.]+$/ && $2 > 0 {
            printf "ratio measured/predicted %-20s %.2f\n", $1, $4 / $2 }'
    cluster_stop
}

run_model "$DS_ROOT/models/tiny" "5,6,7" "10,20,30,40" || fail=1
run_model "$DS_ROOT/tests/data/ref/v3_fp8" "1,2,3" || fail=1
run_model "$DS_ROOT/tests/data/ref/v2_group_limited" "4,5,6,7" || fail=1
[ $fail -eq 0 ] && echo PASS || tail -n 20 "$CLUSTER_DIR"/*.log
exit $fail
