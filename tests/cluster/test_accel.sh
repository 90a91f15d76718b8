#!/usr/bin/env bash
# Experts on an accelerator inside the cluster (labels `cluster`, `opencl`): worker w1 offers
# only its OpenCL device (PoCL here: cpu0 excluded in its devices config), so the placement
# solver gives it experts on w1/opencl0, and w1's host must run them through the OpenCL
# backend. Checks: the plan names opencl0 for those experts, w1 uploaded them to the device,
# ran rows there, and the output is token-identical to `dsctl generate --local` (the CPU
# engine). Skips (77) where no OpenCL device is discovered.
set -u
. "$(dirname "$0")/lib.sh"
trap cluster_cleanup EXIT
need_jq
"$DSCTL" devices --json 2>/dev/null | jq -e '[.node.devices[] | select(.name == "opencl0")] | length > 0' \
    >/dev/null || { echo "SKIP: no OpenCL device on this machine"; exit 77; }
fail=0
M="$DS_ROOT/models/tiny"
bytes=$(cat "$M"/*.safetensors | wc -c)
printf 'device.cpu0.memory_cap = %d\n' $((bytes * 60 / 100)) >"$CLUSTER_DIR/coord.conf"
printf 'device.cpu0.exclude = true\ndevice.opencl0.memory_cap = %d\n' $((bytes * 50 / 100)) \
    >"$CLUSTER_DIR/w1.conf"
CLUSTER_WORKER_ARGS[1]="--discover_opencl=true --devices_config=$CLUSTER_DIR/w1.conf"
cluster_start "$M" 1 --devices_config="$CLUSTER_DIR/coord.conf" --plan_context=64 ||
    { tail -n 20 "$CLUSTER_DIR"/*.log; exit 1; }
on_dev=$("$DSCTL" placement --json | jq '[.plan.devices // {} | to_entries[] | select(.value == "opencl0")] | length')
echo "plan: $on_dev experts on w1/opencl0"
[ "$on_dev" -gt 0 ] || { echo "FAIL: no expert placed on opencl0"; fail=1; }
"$DSCTL" placement | grep -Eq '[0-9]+:w1/opencl0' ||
    { echo "FAIL: dsctl placement does not show experts on w1/opencl0"; fail=1; }
grep -q "MiB of experts on opencl0" "$CLUSTER_DIR/w1.log" ||
    { echo "FAIL: w1 did not upload its experts to opencl0"; fail=1; }
for p in "5,6,7" "10,20,30,40"; do
    for opts in "--max-tokens 12" "--max-tokens 8 --temperature 0.8 --top-k 20 --seed 7"; do
        # shellcheck disable=SC2086
        want=$("$DSCTL" generate --local --model "$M" --tokens "$p" $opts --threads 1 | tail -n1)
        # shellcheck disable=SC2086
        got=$(timeout 60 "$DSCTL" submit --tokens "$p" $opts | tail -n1)
        if [ "$want" = "$got" ] && [ -n "$want" ]; then echo "ok   $p $opts: $got"; else
            echo "FAIL $p $opts: local '$want' cluster '$got'"; fail=1; fi
    done
done
rows=0
for _ in $(seq 30); do # w1's figures arrive with its heartbeats
    rows=$("$DSCTL" placement --json | jq '[.measured.nodes.w1.units // {} | to_entries[]
           | select(.key | startswith("expert")) | .value.rows] | add // 0')
    [ "$rows" -gt 0 ] && break
    sleep 0.1
done
echo "w1 ran $rows expert rows on opencl0"
[ "$rows" -gt 0 ] || { echo "FAIL: w1 ran no expert rows"; fail=1; }
[ $fail -eq 0 ] && echo PASS || tail -n 20 "$CLUSTER_DIR"/*.log
exit $fail
