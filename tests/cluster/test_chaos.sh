#!/usr/bin/env bash
# Chaos, bounded (label `cluster`; docs/operations.md "What happens when"): coordinator + 2
# workers on models/tiny, each capped at 70% of the checkpoint (any two nodes hold it, one
# does not), heartbeats every 200 ms, a node failed after 2 s of silence. Rounds, each while
# 4 jobs of 240 tokens (2 greedy, 2 sampled with their seeds) stream:
#   1. kill -9 w2                       -> replan over coord + w1, the jobs replayed
#   2. (w2 restarted and taken back) SIGSTOP w1 until a plan without it serves, 1 s more, SIGCONT
#   3. cut w1's link (a TCP forwarder between it and the others, SIGSTOPped: open connections,
#      nothing crosses) until a plan without it serves, 1 s more, mend it
#   4. SIGSTOP the coordinator for 5 s, SIGCONT -> it recovers by itself
#   5. kill -9 the coordinator, restart it -> its jobs are lost with it: every client is told
#                                          so (libdsclient asks the new process) within BOUND_S;
#                                          the workers rejoin and it serves again
#   6. kill -9 both workers             -> no plan fits: every job ends with an error saying
#                                          so, within BOUND_S of the kill
# In rounds 1-4 every job must complete with exactly the tokens of `dsctl generate --local`
# (one uninterrupted stream: no client timeout, no error). Printed per round: jobs in flight,
# completed identical, ended with error (and why), time to serve again. Every wait bounded.
set -u
. "$(dirname "$0")/lib.sh"
trap cluster_cleanup EXIT
need_jq
fail=0
M="$DS_ROOT/models/tiny"
BOUND_S=30 # a job that cannot go on ends within this many seconds of the failure
cap_devices 70 "$M" >/dev/null
opts=(--devices_config="$CLUSTER_DIR/devices.conf" --plan_context=300)
# w1 reaches the coordinator, and the others reach w1's data port, through a "link" (a TCP
# forwarder) that round 3 cuts
LINK_C=$((BASE_PORT + 10)) LINK_D=$((BASE_PORT + 11))
python3 "$(dirname "$0")/tcp_proxy.py" "$LINK_C:$BASE_PORT" "$LINK_D:$((BASE_PORT + 3))" &
LINK=$!
CLUSTER_WORKER_ARGS[1]="--coordinator=tcp://127.0.0.1:$LINK_C --data_advertise=tcp://127.0.0.1:$LINK_D"
cluster_start "$M" 2 "${opts[@]}" || { kill $LINK; tail -n 20 "$CLUSTER_DIR"/*.log; exit 1; }
COORD=${CLUSTER_PIDS[0]} W1=${CLUSTER_PIDS[1]} W2=${CLUSTER_PIDS[2]}
CLUSTER_PIDS+=($LINK)
say() { if [ "$1" = ok ]; then echo "ok   $2"; else echo "FAIL $2"; fail=1; fi; }
N_TOK=240
PROMPTS=("5,6,7" "10,20,30,40" "200,3,3,3" "1,2")
SAMPLING=("--greedy" "--greedy" "--temperature 0.9 --seed 11" "--temperature 1.2 --seed 5")
declare -A WANT
for i in 0 1 2 3; do
    # shellcheck disable=SC2086
    WANT[$i]=$("$DSCTL" generate --local --model "$M" --tokens "${PROMPTS[$i]}" \
        --max-tokens $N_TOK --threads 1 ${SAMPLING[$i]} | tail -n1)
done
start_jobs() {
    JOB_PIDS=()
    local i
    for i in 0 1 2 3; do
        # shellcheck disable=SC2086
        DSD_TIMEOUT_MS=60000 timeout 120 "$DSCTL" submit --tokens "${PROMPTS[$i]}" \
            --max-tokens $N_TOK ${SAMPLING[$i]} >"$CLUSTER_DIR/job.$i" 2>&1 &
        JOB_PIDS+=($!)
    done
}
wait_streaming() { # until some job has streamed a few tokens (bounded: 20 s)
    local k
    for ((k = 0; k < 200; k++)); do
        "$DSCTL" jobs --json 2>/dev/null | jq -e '[.jobs[].generated] | max >= 8' >/dev/null && return 0
        sleep 0.1
    done
    return 1
}
wait_serving() { # $1 t0 (date +%s.%N), $2 a plan version: prints the seconds from t0 until the
    # cluster serves a plan newer than $2 (<= 60 s)
    local k
    for ((k = 0; k < 600; k++)); do
        if DSD_TIMEOUT_MS=1000 "$DSCTL" status --json 2>/dev/null |
            jq -e --argjson v "$2" '.state == "serving" and .plan_version > $v' >/dev/null; then
            echo "$(date +%s.%N) - $1" | bc
            return 0
        fi
        sleep 0.1
    done
    echo "never"
    return 1
}
finish_round() { # $1 label, $2 expect: identical | error, $3 t0 of the failure
    local i same=0 errs=0 why="" got
    for i in 0 1 2 3; do wait "${JOB_PIDS[$i]}"; done
    local t_end
    t_end=$(date +%s.%N)
    for i in 0 1 2 3; do
        got=$(tail -n1 "$CLUSTER_DIR/job.$i")
        if [ "$got" = "${WANT[$i]}" ]; then
            same=$((same + 1))
        else
            errs=$((errs + 1))
            why=$(grep -m1 "dsctl generate" "$CLUSTER_DIR/job.$i" | sed 's/.*: job [0-9]* ended with an error: //')
            [ "$2" = identical ] && echo "  job $i: want ${WANT[$i]:0:60}... got ${got:0:200}"
        fi
    done
    printf '  %s: jobs in flight 4, completed identical %d, ended with error %d%s\n' "$1" "$same" \
        "$errs" "${why:+ (why: $why)}"
    if [ "$2" = identical ]; then
        [ $same = 4 ] && say ok "$1: every job completed, token-identical" || say FAIL "$1: $same of 4 identical"
    elif [ "$2" = lost ]; then
        local took
        took=$(echo "$t_end - $3" | bc)
        echo "  $1: the clients were told ${took} s after the kill (bound ${BOUND_S} s)"
        [ $errs = 4 ] && echo "$why" | grep -qE "coordinator restarted|does not run job" &&
            [ "$(echo "$took < $BOUND_S" | bc)" = 1 ] &&
            say ok "$1: every client was told its job is lost, within the bound" ||
            say FAIL "$1: errors $errs, why '$why', after $took s"
    else
        local took
        took=$(echo "$t_end - $3" | bc)
        echo "  $1: the jobs ended ${took} s after the failure (bound ${BOUND_S} s)"
        [ $errs = 4 ] && echo "$why" | grep -q "no plan fits" &&
            [ "$(echo "$took < $BOUND_S" | bc)" = 1 ] &&
            say ok "$1: every job ended with a clear error within the bound" ||
            say FAIL "$1: errors $errs, why '$why', after $took s"
    fi
}
restart_worker() { # $1 name, $2 port offset: starts it again, waits until the plan has 3 nodes
    "$DSD" --node="$1" --role=worker --coordinator="tcp://127.0.0.1:$BASE_PORT" \
        --data_bind="tcp://127.0.0.1:$((BASE_PORT + $2))" --model="$M" --state_dir="$CLUSTER_DIR/$1" \
        --threads=1 --heartbeat_ms=200 --heartbeat_misses=10 --calibrate=false --discover_opencl=false \
        "${opts[@]}" >>"$CLUSTER_DIR/$1.log" 2>&1 &
    CLUSTER_PIDS+=($!)
    RESTARTED=$!
    local k
    for ((k = 0; k < 300; k++)); do
        [ "$("$DSCTL" placement --json 2>/dev/null | jq -r '[.plan.units[] | split("/")[0]] | unique | length')" = 3 ] &&
            [ "$("$DSCTL" status --json | jq -r .state)" = serving ] && return 0
        sleep 0.1
    done
    say FAIL "$1 was not taken back into the plan"
    return 1
}

version() { "$DSCTL" status --json | jq .plan_version; }
replays() { grep -c "replayed on the new plan" "$CLUSTER_DIR/coord.log"; }

# 1. kill -9 a worker
start_jobs
wait_streaming || say FAIL "round 1: no job streamed"
v=$(version) r=$(replays)
t0=$(date +%s.%N)
kill -9 "$W2"
# a job submitted while the cluster replans: refused "not serving" and sent again by dsctl
# (libdsclient's submit_retry_ms), or taken on the old plan and replayed: identical either way
sleep 2.2
late_want=$("$DSCTL" generate --local --model "$M" --tokens 7,7,7 --max-tokens 40 --threads 1 | tail -n1)
DSD_TIMEOUT_MS=60000 timeout 120 "$DSCTL" submit --tokens 7,7,7 --max-tokens 40 >"$CLUSTER_DIR/late" 2>&1 &
late=$!
echo "  round 1: serving a new plan $(wait_serving "$t0" "$v") s after the kill"
finish_round "round 1 (kill -9 w2)" identical
wait $late
[ "$(tail -n1 "$CLUSTER_DIR/late")" = "$late_want" ] &&
    say ok "round 1: a job submitted during the replan completed, token-identical" ||
    say FAIL "round 1: the job submitted during the replan: $(cat "$CLUSTER_DIR/late")"
[ "$(replays)" -gt "$r" ] && say ok "round 1: $(($(replays) - r)) jobs replayed on the new plan" ||
    say FAIL "round 1: no job was replayed"

# 2. a worker hung longer than the failure timeout
restart_worker w2 4
W2=$RESTARTED
start_jobs
wait_streaming || say FAIL "round 2: no job streamed"
v=$(version) r=$(replays)
t0=$(date +%s.%N)
kill -STOP "$W1"
echo "  round 2: serving a new plan $(wait_serving "$t0" "$v") s after w1 stopped"
sleep 1
kill -CONT "$W1"
finish_round "round 2 (SIGSTOP w1 past the failure timeout)" identical
[ "$(replays)" -gt "$r" ] && say ok "round 2: $(($(replays) - r)) jobs replayed on the new plan" ||
    say FAIL "round 2: no job was replayed"
for ((k = 0; k < 300; k++)); do # w1 back in the plan once idle
    [ "$("$DSCTL" placement --json 2>/dev/null | jq -r '[.plan.units[] | split("/")[0]] | unique | length')" = 3 ] && break
    sleep 0.1
done

# 3. w1's link cut (nothing crosses it, the connections stay open) past the failure timeout
start_jobs
wait_streaming || say FAIL "round 3: no job streamed"
v=$(version) r=$(replays)
t0=$(date +%s.%N)
kill -STOP "$LINK"
echo "  round 3: serving a new plan $(wait_serving "$t0" "$v") s after the cut"
sleep 1
kill -CONT "$LINK"
finish_round "round 3 (w1's link cut)" identical
[ "$(replays)" -gt "$r" ] && say ok "round 3: $(($(replays) - r)) jobs replayed on the new plan" ||
    say FAIL "round 3: no job was replayed"
for ((k = 0; k < 300; k++)); do # w1 back in the plan once the link is back and no job runs
    [ "$("$DSCTL" placement --json 2>/dev/null | jq -r '[.plan.units[] | split("/")[0]] | unique | length')" = 3 ] && break
    sleep 0.1
done

# 4. the coordinator hung for 5 s
start_jobs
wait_streaming || say FAIL "round 4: no job streamed"
t0=$(date +%s.%N)
kill -STOP "$COORD"
sleep 5
kill -CONT "$COORD"
echo "  round 4: serving $(wait_serving "$t0" 0) s after the stop (5 s of it stopped)"
finish_round "round 4 (SIGSTOP coordinator 5 s)" identical
grep -q "event loop stalled" "$CLUSTER_DIR/coord.log" && say ok "the coordinator noticed its stall" ||
    say FAIL "no stall line in coord.log"

# 5. the coordinator dies and restarts: its jobs are lost with it (they live in its memory);
# every client is told so within the bound, the workers rejoin, and it serves again
start_jobs
wait_streaming || say FAIL "round 5: no job streamed"
t0=$(date +%s.%N)
kill -9 "$COORD"
wait "$COORD" 2>/dev/null
sleep 1
"$DSD" --node=coord --role=coordinator --expect_workers=2 \
    --control_bind="tcp://127.0.0.1:$BASE_PORT" --client_bind="tcp://127.0.0.1:$((BASE_PORT + 1))" \
    --data_bind="tcp://127.0.0.1:$((BASE_PORT + 2))" --model="$M" --state_dir="$CLUSTER_DIR/coord" \
    --threads=1 --heartbeat_ms=200 --heartbeat_misses=10 --calibrate=false --discover_opencl=false \
    "${opts[@]}" >>"$CLUSTER_DIR/coord.log" 2>&1 &
COORD=$!
CLUSTER_PIDS+=($COORD)
finish_round "round 5 (kill -9 and restart the coordinator)" lost "$t0"
echo "  round 5: serving again $(wait_serving "$t0" 0) s after the kill"
late_want=$("$DSCTL" generate --local --model "$M" --tokens 9,8,7 --max-tokens 30 --threads 1 | tail -n1)
[ "$(timeout 60 "$DSCTL" submit --tokens 9,8,7 --max-tokens 30 | tail -n1)" = "$late_want" ] &&
    say ok "round 5: the restarted coordinator serves, token-identical" ||
    say FAIL "round 5: the restarted coordinator does not serve identical tokens"

# 6. no plan fits: both workers gone
start_jobs
wait_streaming || say FAIL "round 6: no job streamed"
t0=$(date +%s.%N)
kill -9 "$W1" "$W2"
finish_round "round 6 (kill -9 w1 and w2)" error "$t0"
st=$("$DSCTL" status --json)
echo "$st" | jq -r .plan_error | grep -q "." && say ok "plan_error: $(echo "$st" | jq -r .plan_error)" ||
    say FAIL "no plan_error: $st"
out=$(DSD_SUBMIT_RETRY_MS=1000 timeout 30 "$DSCTL" submit --tokens 5,6,7 --max-tokens 4 2>&1)
echo "$out" | grep -q "not serving" && say ok "a new submit without a plan: $out" ||
    say FAIL "a new submit without a plan: $out"
exit $fail
