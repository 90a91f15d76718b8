#!/usr/bin/env bash
# Failover (label `cluster`): coordinator + 2 workers on models/tiny, each capped at 70% of the
# checkpoint (the plan must split it; any two nodes can hold it). Kill -9 worker w2: the
# coordinator notices the missing heartbeats, replans over coord + w1 by itself (auto_replan),
# serves again, and its output is still token-identical to `dsctl generate --local`. Start w2
# again: once no job runs, the coordinator takes it back into a new plan. Replans after traffic
# use the measured routing counts as expert popularity; the solver's extra copies of hot
# experts are hosted and used beside their attention layer. Every wait bounded.
set -u
. "$(dirname "$0")/lib.sh"
trap cluster_cleanup EXIT
need_jq
fail=0
M="$DS_ROOT/models/tiny"
cap_devices 70 "$M" >/dev/null
opts=(--devices_config="$CLUSTER_DIR/devices.conf" --plan_context=64)
cluster_start "$M" 2 "${opts[@]}" || { tail -n 20 "$CLUSTER_DIR"/*.log; exit 1; }
check_tokens() { # $1: label
    local p want got
    for p in "5,6,7" "10,20,30,40"; do
        want=$("$DSCTL" generate --local --model "$M" --tokens "$p" --max-tokens 10 --threads 1 | tail -n1)
        got=$(timeout 60 "$DSCTL" submit --tokens "$p" --max-tokens 10 | tail -n1)
        if [ "$want" = "$got" ] && [ -n "$want" ]; then echo "ok   $1, prompt $p: $got"; else
            echo "FAIL $1, prompt $p: local '$want' cluster '$got'"; fail=1; fi
    done
}
plan_nodes() { "$DSCTL" placement --json | jq -r '[.plan.units[] | split("/")[0]] | unique | join(",")'; }
wait_plan() { # $1: version greater than this, $2: nodes wanted
    local i st v
    for ((i = 0; i < 150; i++)); do
        st=$("$DSCTL" status --json 2>/dev/null)
        v=$(echo "$st" | jq -r '.plan_version // 0')
        if [ "$v" -gt "$1" ] && [ "$(echo "$st" | jq -r .state)" = serving ] &&
            [ "$(plan_nodes)" = "$2" ]; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}
v1=$("$DSCTL" status --json | jq .plan_version)
echo "plan v$v1 over $(plan_nodes)"
[ "$(plan_nodes)" = "coord,w1,w2" ] || { echo "FAIL: the first plan does not use all three nodes"; fail=1; }
check_tokens "3 nodes"
# the solver's extra copies of hot experts: every node got the same replica sets, and a node
# holding a copy of an expert of a layer whose attention it runs computes it there
reps=$("$DSCTL" placement --json | jq -c '.plan.replicas // {}')
echo "replicas: $reps"
for w in w1 w2; do
    [ "$(jq -c '.replicas // {}' "$CLUSTER_DIR/$w/plan.json")" = "$reps" ] ||
        { echo "FAIL: $w's plan.json has other replicas"; fail=1; }
done
sleep 0.5 # the workers' figures arrive with their heartbeats
pj=$("$DSCTL" placement --json)
pairs=0 local_rows=0
for u in $(echo "$reps" | jq -r 'keys[]'); do
    l=${u#expert[}; l=${l%%]*}
    for node in $(echo "$reps" | jq -r --arg u "$u" '.[$u][]'); do
        [ "$(echo "$pj" | jq -r --arg a "attn[$l]" '.plan.units[$a]')" = "$node" ] || continue
        rows=$(echo "$pj" | jq --arg n "$node" --arg u "$u" '.measured.nodes[$n].units[$u].rows // 0')
        echo "  $u: copy on $node (which runs attn[$l]) computed $rows rows"
        pairs=$((pairs + 1)) local_rows=$((local_rows + rows))
    done
done
if [ "$pairs" -gt 0 ] && [ "$local_rows" -eq 0 ]; then
    echo "FAIL: no copy beside its attention layer computed anything (rows went elsewhere)"; fail=1
fi

# w2 dies without a word
kill -9 "${CLUSTER_PIDS[2]}"
wait "${CLUSTER_PIDS[2]}" 2>/dev/null
if wait_plan "$v1" "coord,w1"; then
    v2=$("$DSCTL" status --json | jq .plan_version)
    echo "ok   w2 killed: replanned by itself, plan v$v2 over $(plan_nodes)"
else
    echo "FAIL: no new plan over coord,w1 after w2 died"; "$DSCTL" status; fail=1; v2=$v1
fi
[ "$("$DSCTL" status --json | jq -r '.nodes[] | select(.name == "w2") | .state')" = failed ] ||
    { echo "FAIL: status does not show w2 failed"; fail=1; }
check_tokens "w2 down"
# that replan came after traffic: the solver got the measured routing counts as popularity
grep -q "measured expert routings as popularity" "$CLUSTER_DIR/coord.log" ||
    { echo "FAIL: the replan did not use the measured expert statistics"; fail=1; }
# and an operator can feed the same counts to the offline planner
"$DSCTL" placement --json | jq .measured.expert_stats >"$CLUSTER_DIR/stats.json"
"$DSCTL" cluster --json >"$CLUSTER_DIR/spec.json"
if "$DSCTL" plan --cluster "$CLUSTER_DIR/spec.json" --model "$M" --expert-stats "$CLUSTER_DIR/stats.json" \
    --json >"$CLUSTER_DIR/offline.json"; then
    echo "ok   dsctl plan --expert-stats accepts the cluster's measured counts"
else
    echo "FAIL: dsctl plan refused the measured expert stats"; fail=1
fi

# w2 comes back: taken in again once idle
"$DSD" --node=w2 --role=worker --coordinator="tcp://127.0.0.1:$BASE_PORT" \
    --data_bind="tcp://127.0.0.1:$((BASE_PORT + 4))" --model="$M" --state_dir="$CLUSTER_DIR/w2" \
    --threads=1 --heartbeat_ms=200 --heartbeat_misses=10 --calibrate=false --discover_opencl=false "${opts[@]}" \
    >>"$CLUSTER_DIR/w2.log" 2>&1 &
CLUSTER_PIDS+=($!)
if wait_plan "$v2" "coord,w1,w2"; then
    echo "ok   w2 back: plan v$("$DSCTL" status --json | jq .plan_version) over $(plan_nodes)"
else
    echo "FAIL: w2 was not taken back into a plan"; "$DSCTL" status; fail=1
fi
check_tokens "w2 back"
[ $fail -eq 0 ] && echo PASS || tail -n 30 "$CLUSTER_DIR"/*.log
exit $fail
