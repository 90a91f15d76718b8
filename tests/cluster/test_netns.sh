#!/usr/bin/env bash
# netns test (label `netns`, needs root): a small cluster in network namespaces joined by veth
# pairs to a bridge. The "edge box" worker's link is shaped with tc (netem 5 ms delay + 100 Mbit
# where the kernel has sch_netem, else tbf 100 Mbit alone) and its memory is capped. Checks: the
# link calibration over the real sockets sees the slow edge link (bandwidth below the fast
# one's) in `dsctl cluster --json`; the first plan (made once the links are measured) and the
# plan after `dsctl replan` keep the latency-critical units (embed, head, every attn[l]) off
# the edge; the edge box, which has no checkpoint copy, gets its units' weights streamed;
# generation is still token-identical to `dsctl generate --local`. Skips cleanly without root
# or when namespaces / the bridge cannot be created.
set -u
: "${DS_BUILD:?}" "${DS_ROOT:?}"
DSD="$DS_BUILD/daemon/dsd"
DSCTL="$DS_BUILD/client/dsctl"
if [ "$(id -u)" != 0 ]; then echo "SKIP: needs root for network namespaces"; exit 0; fi
tag=d$$
NS=("${tag}c" "${tag}f" "${tag}e")   # coordinator, fast worker, edge worker
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
    done
    for n in "${NS[@]}"; do ip netns del "$n" 2>/dev/null; done
    ip link del "${tag}br" 2>/dev/null
    rm -rf "$tmp"
}
tmp=$(mktemp -d)
trap cleanup EXIT
if ! ip link add "${tag}br" type bridge 2>/dev/null; then echo "SKIP: cannot create a bridge"; exit 0; fi
ip link set "${tag}br" up
i=1
for n in "${NS[@]}"; do
    ip netns add "$n" || { echo "SKIP: cannot create network namespaces"; exit 0; }
    ip link add "${tag}v$i" type veth peer name eth0 netns "$n"
    ip link set "${tag}v$i" master "${tag}br" up
    ip -n "$n" addr add "10.77.0.$i/24" dev eth0
    ip -n "$n" link set eth0 up
    ip -n "$n" link set lo up
    i=$((i + 1))
done
shaped=1
if ip netns exec "${NS[2]}" tc qdisc add dev eth0 root netem delay 5ms rate 100mbit 2>/dev/null; then
    echo "edge link: netem 5 ms + 100 Mbit"
elif ip netns exec "${NS[2]}" tc qdisc add dev eth0 root tbf rate 100mbit burst 32kbit latency 400ms 2>/dev/null; then
    echo "edge link: tbf 100 Mbit (sch_netem is not in this kernel)"
else
    echo "NOTE: tc tbf is not available: links unshaped, bandwidth check skipped"
    shaped=0
fi
model="$DS_ROOT/tests/data/ref/v3_bf16"
[ -f "$DS_ROOT/models/tiny/config.json" ] && model="$DS_ROOT/models/tiny"
common=(--model="$model" --threads=1 --heartbeat_ms=200 --calibrate=false --discover_opencl=false
        --plan_context=64)
# memory caps (devices memory_cap): coordinator and fast worker 60% of the checkpoint each (the
# model needs both), the edge box 30%
bytes=$(cat "$model"/*.safetensors | wc -c)
printf 'device.cpu0.memory_cap = %d\n' $((bytes * 60 / 100)) >"$tmp/big.conf"
printf 'device.cpu0.memory_cap = %d\n' $((bytes * 30 / 100)) >"$tmp/edge.conf"
ip netns exec "${NS[0]}" "$DSD" --node=coord --expect_workers=2 --control_bind=tcp://10.77.0.1:7100 \
    --client_bind=tcp://10.77.0.1:7101 --data_bind=tcp://10.77.0.1:7102 --state_dir="$tmp/c" \
    --devices_config="$tmp/big.conf" "${common[@]}" >"$tmp/c.log" 2>&1 &
PIDS+=($!)
ip netns exec "${NS[1]}" "$DSD" --node=fast --role=worker --coordinator=tcp://10.77.0.1:7100 \
    --data_bind=tcp://10.77.0.2:7102 --state_dir="$tmp/f" --devices_config="$tmp/big.conf" \
    "${common[@]}" >"$tmp/f.log" 2>&1 &
PIDS+=($!)
ip netns exec "${NS[2]}" "$DSD" --node=edge --role=worker --coordinator=tcp://10.77.0.1:7100 \
    --data_bind=tcp://10.77.0.3:7102 --state_dir="$tmp/e" --devices_config="$tmp/edge.conf" \
    "${common[@]}" --model="$tmp/edge-has-no-copy" >"$tmp/e.log" 2>&1 &
PIDS+=($!)
export DSD_ENDPOINT=tcp://10.77.0.1:7101
ctl() { ip netns exec "${NS[0]}" "$DSCTL" "$@"; }
for _ in $(seq 150); do ctl status --json 2>/dev/null | grep -q '"state": "serving"' && break; sleep 0.2; done
fail=0
# the coordinator measures the link to every node as it joins and plans once they are known
spec=$(ctl cluster --json)
link() { echo "$spec" | jq -r --arg n "$1" '[.links[] | select(.a == $n or .b == $n)
         | select(.a == "coord" or .b == "coord")][0] // {} | "\(.bandwidth_bytes_per_s) \(.latency_s)"'; }
read -r be le <<<"$(link edge)"
read -r bf lf <<<"$(link fast)"
echo "calibrated: fast $bf B/s $lf s, edge $be B/s $le s"
[ "$be" != null ] && [ "$bf" != null ] || { echo "FAIL: links missing from the cluster spec"; fail=1; }
if [ $shaped = 1 ]; then
    # tbf at 100 Mbit = 12.5 MB/s; the unshaped veth is far faster
    awk -v e="${be:-1e12}" -v f="${bf:-0}" 'BEGIN { exit !(e < 5e7 && f > 4 * e) }' ||
        { echo "FAIL: calibration does not show the shaped edge link"; fail=1; }
fi
check_plan() { # $1: which plan
    plan=$(ctl placement --json)
    solver=$(echo "$plan" | jq -r .plan.solver)
    n_edge=$(echo "$plan" | jq '[.plan.units | to_entries[] | select(.value == "edge")
             | select(.key | test("^(attn|embed|head)"))] | length')
    n_edge_exp=$(echo "$plan" | jq '[.plan.units | to_entries[] | select(.value == "edge")
             | select(.key | test("^expert"))] | length')
    echo "$1 (solver '$solver'): edge hosts $n_edge latency-critical units, $n_edge_exp experts"
    [ -n "$solver" ] && [ "$solver" != round-robin ] || { echo "FAIL: not the solver's plan"; fail=1; }
    [ "$n_edge" = 0 ] || { echo "FAIL: embed/head/attention placed on the slow edge box"; fail=1; }
}
check_plan "first plan"
# the edge box has no checkpoint copy: the coordinator streamed its units over the slow link
grep -q "weights: [0-9]* bytes received" "$tmp/e.log" &&
    echo "edge: $(grep -o 'weights: [0-9]* bytes received' "$tmp/e.log" | tail -n1) over the shaped link" ||
    { echo "FAIL: the edge box did not receive its weights"; fail=1; }
# plan again (the workers' own link measurements are in by now): still off the edge
ctl replan >/dev/null || { echo "FAIL: replan"; fail=1; }
for _ in $(seq 150); do ctl status --json 2>/dev/null | grep -q '"state": "serving"' && break; sleep 0.2; done
check_plan "replan"
for p in "5,6,7" "10,20,30,40"; do
    want=$("$DSCTL" generate --local --model "$model" --tokens "$p" --max-tokens 8 --threads 1 | tail -n1)
    got=$(timeout 120 ip netns exec "${NS[0]}" "$DSCTL" submit --tokens "$p" --max-tokens 8 | tail -n1)
    if [ "$want" = "$got" ] && [ -n "$want" ]; then echo "ok   $p: $got"; else
        echo "FAIL $p: local '$want' cluster '$got'"; fail=1; fi
done
[ $fail = 0 ] && echo PASS || tail -n 20 "$tmp"/*.log
exit $fail
