#!/usr/bin/env bash
# Bounds (label `cluster`, docs/operations.md "What happens when"): coordinator + 2 workers on
# models/tiny, each capped at 45% of the checkpoint (the model needs all three). A hostile peer
# (tests/cluster/zmtp_peer.py, raw ZMTP, no libzmq) then
#   - announces an 8 GiB frame on the control, client and data ports of the coordinator and on
#     a worker's data port and streams 64 MiB of it: the connection is dropped, the daemon's
#     memory stays bounded (< 48 MiB more than before);
#   - sends a step opening 8193 new sequences to the host of attn[1]: refused, nothing kept;
#   - says hello with a device of flops = -1, NaN, 1e300: refused with the field named, the
#     plan untouched;
# and an operator drains w1 and asks `dsctl replan`: no plan fits on coord + w2, so the reply
# says why and plan v1 goes on serving. After each, jobs still give exactly the tokens of
# `dsctl generate --local`. Every wait is bounded.
set -u
. "$(dirname "$0")/lib.sh"
trap cluster_cleanup EXIT
need_jq
command -v python3 >/dev/null || { echo "python3 missing"; exit 1; }
PEER="python3 $(dirname "$0")/zmtp_peer.py"
fail=0
M="$DS_ROOT/models/tiny"
cap_devices 45 "$M" >/dev/null
cluster_start "$M" 2 --devices_config="$CLUSTER_DIR/devices.conf" --plan_context=64 ||
    { tail -n 20 "$CLUSTER_DIR"/*.log; exit 1; }
COORD_PID=${CLUSTER_PIDS[0]} W1_PID=${CLUSTER_PIDS[1]}
say() { if [ "$1" = ok ]; then echo "ok   $2"; else echo "FAIL $2"; fail=1; fi; }
check_tokens() { # $1: label; 3 concurrent jobs, each against the in-process engine
    local p i=0 pids=() want got
    local prompts=("5,6,7" "10,20,30,40" "200,3,3,3")
    for p in "${prompts[@]}"; do
        timeout 60 "$DSCTL" submit --tokens "$p" --max-tokens 12 >"$CLUSTER_DIR/got.$i" 2>&1 &
        pids+=($!)
        i=$((i + 1))
    done
    i=0
    for p in "${prompts[@]}"; do
        wait "${pids[$i]}"
        want=$("$DSCTL" generate --local --model "$M" --tokens "$p" --max-tokens 12 --threads 1 | tail -n1)
        got=$(tail -n1 "$CLUSTER_DIR/got.$i")
        if [ -n "$want" ] && [ "$want" = "$got" ]; then say ok "$1, prompt $p: $got"; else
            say FAIL "$1, prompt $p: local '$want' cluster '$got'"; fi
        i=$((i + 1))
    done
}
rss_mib() { awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$1/status"; }
state() { "$DSCTL" status --json | jq -r .state; }
version() { "$DSCTL" status --json | jq -r .plan_version; }
check_tokens "before"
v1=$(version)

# 1. oversized frames: every port of the coordinator, a worker's data port
P=$BASE_PORT
for target in "coordinator control:$COORD_PID:$P" "coordinator client:$COORD_PID:$((P + 1))" \
    "coordinator data:$COORD_PID:$((P + 2))" "w1 data:$W1_PID:$((P + 3))"; do
    IFS=: read -r what pid port <<<"$target"
    before=$(rss_mib "$pid")
    out=$($PEER bigframe 127.0.0.1 "$port" 64 2>&1)
    sleep 0.5
    after=$(rss_mib "$pid")
    echo "  $what: $out; RSS $before -> $after MiB"
    case "$out" in "closed after"*) ;; *) say FAIL "$what: an 8 GiB frame was not refused ($out)" ;; esac
    [ $((after - before)) -lt 48 ] && say ok "$what: memory bounded after an 8 GiB frame" ||
        say FAIL "$what: RSS grew $before -> $after MiB"
done
[ "$(state)" = serving ] && say ok "serving after oversized frames" || say FAIL "state $(state)"
check_tokens "after oversized frames"

# 2. a step opening 8193 new sequences at the host of attn[1]
host=$("$DSCTL" placement --json | jq -r '.plan.units["attn[1]"]')
case "$host" in coord) port=$((P + 2)) ;; w1) port=$((P + 3)) ;; *) port=$((P + 4)) ;; esac
out=$($PEER step 127.0.0.1 "$port" "$v1" 1 8193 256 2>&1)
echo "  step of 8193 new sequences to $host: $out"
case "$out" in *"new sequences"* | *"not a member"*) say ok "sequence flood refused" ;;
*) say FAIL "sequence flood: $out" ;; esac
check_tokens "after a sequence flood"

# 3. hellos whose profile cannot be true
for flops in -1 nan 1e300; do
    out=$($PEER hello 127.0.0.1 "$P" "bogus" "$flops" 2>&1)
    echo "  hello with flops = $flops: $out"
    case "$out" in *"error 2"*flops*) say ok "hello with flops = $flops refused" ;;
    *) say FAIL "hello with flops = $flops: $out" ;; esac
done
grep -q "refused hello from 'bogus'.*flops" "$CLUSTER_DIR/coord.log" &&
    say ok "the coordinator logged the refusal" || say FAIL "no refusal in coord.log"
st=$("$DSCTL" status --json)
[ "$(echo "$st" | jq -r .state)" = serving ] && [ "$(echo "$st" | jq -r .plan_version)" = "$v1" ] &&
    ! echo "$st" | jq -e '.nodes[] | select(.name == "bogus")' >/dev/null &&
    say ok "plan v$v1 untouched, bogus is no member" || say FAIL "after bogus hellos: $st"
check_tokens "after bogus hellos"

# 4. a replan that cannot succeed keeps the plan serving and says why
"$DSCTL" drain w1 >/dev/null || say FAIL "drain w1"
out=$(timeout 60 "$DSCTL" replan 2>&1)
rc=$?
echo "  dsctl replan with w1 drained: rc $rc: $out"
[ $rc -ne 0 ] && echo "$out" | grep -q "replan failed" && say ok "the failed replan says why" ||
    say FAIL "replan: rc $rc '$out'"
st=$("$DSCTL" status --json)
[ "$(echo "$st" | jq -r .state)" = serving ] && [ "$(echo "$st" | jq -r .plan_version)" = "$v1" ] &&
    echo "$st" | jq -r .plan_error | grep -q "goes on serving" &&
    say ok "plan v$v1 goes on serving: $(echo "$st" | jq -r .plan_error)" ||
    say FAIL "after the failed replan: $st"
check_tokens "after a failed replan"
"$DSCTL" undrain w1 >/dev/null
out=$(timeout 60 "$DSCTL" replan 2>&1) && say ok "replan after undrain: $out" || say FAIL "replan: $out"
check_tokens "after a replan"
exit $fail
