#!/usr/bin/env bash
# Data-plane membership (label `cluster`, docs/daemon.md "Names and identity"): coordinator +
# 2 workers on models/tiny, each capped at 45% (the plan uses all three), no CURVE. While 4
# jobs of 120 tokens run, a raw ZMTP peer (tests/cluster/zmtp_peer.py flood) that reaches
# every data port but is no member of the plan sends, without pause, forged head results and
# errors for every request id 1..400 to the coordinator, steps over the running jobs'
# sequences (positions 0 and 3, every layer: a KV cache overwritten) and cancels of jobs 1..4
# to every node, with the current plan version. None of it may change any job: each ends
# `length` with exactly the tokens of `dsctl generate --local`, and the nodes log the
# refusals. Then the same with a replayed (older) plan version. Every wait is bounded.
set -u
. "$(dirname "$0")/lib.sh"
trap 'touch "$CLUSTER_DIR/stop"; cluster_cleanup' EXIT
need_jq
PEER="python3 $(dirname "$0")/zmtp_peer.py"
fail=0
M="$DS_ROOT/models/tiny"
cap_devices 45 "$M" >/dev/null
cluster_start "$M" 2 --devices_config="$CLUSTER_DIR/devices.conf" --plan_context=160 ||
    { tail -n 20 "$CLUSTER_DIR"/*.log; exit 1; }
say() { if [ "$1" = ok ]; then echo "ok   $2"; else echo "FAIL $2"; fail=1; fi; }
P=$BASE_PORT
PROMPTS=("5,6,7" "10,20,30,40" "200,3,3,3" "1,2")
declare -A WANT
for p in "${PROMPTS[@]}"; do
    WANT[$p]=$("$DSCTL" generate --local --model "$M" --tokens "$p" --max-tokens 120 --threads 1 | tail -n1)
done
run_round() { # $1: label, $2: plan version the forger claims
    local v=$2 i=0 pids=() fl=() p got
    rm -f "$CLUSTER_DIR/stop"
    for port in $((P + 2)) $((P + 3)) $((P + 4)); do
        $PEER flood 127.0.0.1 "$port" "$v" 4 256 400 8 "$CLUSTER_DIR/stop" 60 \
            >"$CLUSTER_DIR/flood.$port" 2>&1 &
        fl+=($!)
    done
    sleep 0.3 # the flood is under way before the jobs start
    for p in "${PROMPTS[@]}"; do
        timeout 90 "$DSCTL" submit --tokens "$p" --max-tokens 120 >"$CLUSTER_DIR/got.$i" 2>&1 &
        pids+=($!)
        i=$((i + 1))
    done
    i=0
    for p in "${PROMPTS[@]}"; do
        wait "${pids[$i]}"
        got=$(tail -n1 "$CLUSTER_DIR/got.$i")
        if [ -n "${WANT[$p]}" ] && [ "$got" = "${WANT[$p]}" ]; then
            say ok "$1, prompt $p: 120 tokens as --local"
        else
            say FAIL "$1, prompt $p: local '${WANT[$p]}' cluster '$got'"
        fi
        i=$((i + 1))
    done
    touch "$CLUSTER_DIR/stop"
    for f in "${fl[@]}"; do wait "$f"; done
    echo "  forger: $(cat "$CLUSTER_DIR"/flood.* | tr '\n' ' ')"
    grep -q "^sent [1-9]" "$CLUSTER_DIR/flood.$((P + 2))" || say FAIL "$1: the forger sent nothing"
}
v=$("$DSCTL" status --json | jq .plan_version)
run_round "forged messages, plan v$v" "$v"
for n in coord w1 w2; do
    grep -q "not from a member of plan v$v" "$CLUSTER_DIR/$n.log" &&
        say ok "$n logged the refusals: $(grep -o "refused '[a-z]*' (request [0-9]*): not from a member.*" "$CLUSTER_DIR/$n.log" | tail -n1)" ||
        say FAIL "$n logged no refusal"
done
[ "$("$DSCTL" status --json | jq -r .state)" = serving ] && say ok "still serving" || say FAIL "state"
# the same forged messages claiming the previous plan (a replay of an old one)
out=$(timeout 60 "$DSCTL" replan 2>&1) || say FAIL "replan: $out"
run_round "replayed plan v$v after replan" "$v"
exit $fail
