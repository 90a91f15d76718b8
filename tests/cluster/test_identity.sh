#!/usr/bin/env bash
# Names and identity (label `cluster`, docs/operations.md "What happens when"): coordinator +
# 2 workers on models/tiny, each capped at 70% of the checkpoint (any two nodes hold it). Then:
#   - a second worker named w1: refused at hello, both logs say the name is taken;
#   - a second daemon on w1's state_dir: exits at once (2) naming w1's pid;
#   - a worker whose checkpoint has the same shapes but other weights: refused, both digests
#     named;
#   - a worker whose checkpoint is truncated, and one without a copy whose state_dir cannot
#     store streamed weights: members marked `unusable` with the reason, planned around;
#   - a coordinator whose model path does not exist: `no-plan`, plan_error and `dsctl status`
#     say so.
# The cluster keeps serving tokens identical to `dsctl generate --local`. Every wait bounded.
set -u
. "$(dirname "$0")/lib.sh"
trap cluster_cleanup EXIT
need_jq
fail=0
M="$DS_ROOT/models/tiny"
cap_devices 70 "$M" >/dev/null
opts=(--devices_config="$CLUSTER_DIR/devices.conf" --plan_context=64)
cluster_start "$M" 2 "${opts[@]}" || { tail -n 20 "$CLUSTER_DIR"/*.log; exit 1; }
W1_PID=${CLUSTER_PIDS[1]}
P=$BASE_PORT
say() { if [ "$1" = ok ]; then echo "ok   $2"; else echo "FAIL $2"; fail=1; fi; }
check_tokens() { # $1: label
    local p want got
    for p in "5,6,7" "10,20,30,40"; do
        want=$("$DSCTL" generate --local --model "$M" --tokens "$p" --max-tokens 10 --threads 1 | tail -n1)
        got=$(timeout 60 "$DSCTL" submit --tokens "$p" --max-tokens 10 | tail -n1)
        if [ -n "$want" ] && [ "$want" = "$got" ]; then say ok "$1, prompt $p: $got"; else
            say FAIL "$1, prompt $p: local '$want' cluster '$got'"; fi
    done
}
worker() { # NAME PORT_OFFSET LOG [dsd options...]: one more worker, in the background
    local name=$1 off=$2 log=$3
    shift 3
    "$DSD" --node="$name" --role=worker --coordinator="tcp://127.0.0.1:$P" \
        --data_bind="tcp://127.0.0.1:$((P + off))" --threads=1 --heartbeat_ms=200 \
        --heartbeat_misses=10 --calibrate=false --discover_opencl=false "${opts[@]}" "$@" \
        >"$CLUSTER_DIR/$log.log" 2>&1 &
    CLUSTER_PIDS+=($!)
}
wait_grep() { # FILE REGEX: bounded wait (20 s) for a line
    local i
    for ((i = 0; i < 200; i++)); do
        grep -qE "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
plan_nodes() { "$DSCTL" placement --json | jq -r '[.plan.units[] | split("/")[0]] | unique | join(",")'; }
check_tokens "3 nodes"

# a second worker called w1
worker w1 5 dup --model="$M" --state_dir="$CLUSTER_DIR/dup"
wait_grep "$CLUSTER_DIR/dup.log" "refused us: .*name 'w1' is already taken" &&
    say ok "the second w1 is told: $(grep -m1 -o "node name 'w1'.*" "$CLUSTER_DIR/dup.log")" ||
    say FAIL "the second w1 was not told its name is taken"
grep -qE "refused hello from 'w1#[0-9a-f]+': node name 'w1' is already taken" "$CLUSTER_DIR/coord.log" &&
    say ok "the coordinator logged the duplicate name" || say FAIL "no duplicate-name line in coord.log"
st=$("$DSCTL" status --json)
[ "$(echo "$st" | jq '[.nodes[] | select(.name == "w1")] | length')" = 1 ] &&
    [ "$(echo "$st" | jq -r .state)" = serving ] &&
    say ok "one w1 in the cluster, serving" || say FAIL "status after the duplicate: $st"
kill "${CLUSTER_PIDS[-1]}" 2>/dev/null

# a second daemon on w1's state_dir
"$DSD" --node=w9 --role=worker --coordinator="tcp://127.0.0.1:$P" --data_bind="tcp://127.0.0.1:$((P + 6))" \
    --model="$M" --state_dir="$CLUSTER_DIR/w1" --calibrate=false --discover_opencl=false \
    >"$CLUSTER_DIR/lock.log" 2>&1 &
lock_pid=$!
for ((i = 0; i < 100; i++)); do kill -0 $lock_pid 2>/dev/null || break; sleep 0.1; done
if kill -0 $lock_pid 2>/dev/null; then
    kill -9 $lock_pid; say FAIL "a second daemon on w1's state_dir keeps running"
else
    wait $lock_pid; rc=$?
    [ $rc = 2 ] && grep -q "is in use by another dsd (pid $W1_PID" "$CLUSTER_DIR/lock.log" &&
        say ok "second daemon on w1's state_dir: exit 2, $(grep -o 'state_dir.*' "$CLUSTER_DIR/lock.log" | head -n1)" ||
        say FAIL "second daemon on the state_dir: rc $rc, $(cat "$CLUSTER_DIR/lock.log")"
fi

# the same shapes, other weights: every 4th byte of the data region changed, header kept
mkdir -p "$CLUSTER_DIR/other" "$CLUSTER_DIR/trunc"
cp "$M"/*.json "$CLUSTER_DIR/other/"
cp "$M"/*.json "$CLUSTER_DIR/trunc/"
python3 - "$M/model.safetensors" "$CLUSTER_DIR/other/model.safetensors" <<'EOF'
import struct, sys
b = bytearray(open(sys.argv[1], "rb").read())
start = 8 + struct.unpack("<Q", b[:8])[0]
for i in range(start + 1, len(b), 4):
    b[i] ^= 0x01
open(sys.argv[2], "wb").write(b)
EOF
worker w3 7 other --model="$CLUSTER_DIR/other" --state_dir="$CLUSTER_DIR/w3"
wait_grep "$CLUSTER_DIR/other.log" "refused us: .*model digest mismatch" &&
    grep -qE "model digest mismatch: node w3 has fnv2x64:[0-9a-f]{32}, the coordinator has fnv2x64:[0-9a-f]{32}" "$CLUSTER_DIR/coord.log" &&
    say ok "other weights refused: $(grep -m1 -o 'model digest mismatch[^;]*' "$CLUSTER_DIR/coord.log")" ||
    say FAIL "a checkpoint with other weights was not refused"
"$DSCTL" status --json | jq -e '.refused[] | select(.name == "w3") | .reason | test("digest")' >/dev/null &&
    say ok "dsctl status lists w3 as refused" || say FAIL "w3 not in status .refused"

# a truncated checkpoint, and no copy with a state_dir that cannot store files
head -c $(($(wc -c <"$M/model.safetensors") / 2)) "$M/model.safetensors" >"$CLUSTER_DIR/trunc/model.safetensors"
worker w4 8 trunc --model="$CLUSTER_DIR/trunc" --state_dir="$CLUSTER_DIR/w4"
touch "$CLUSTER_DIR/afile"
worker w5 9 nostate --model="$CLUSTER_DIR/no-such-model" --state_dir="$CLUSTER_DIR/afile/state"
ok=0
for ((i = 0; i < 200; i++)); do
    st=$("$DSCTL" status --json)
    if [ "$(echo "$st" | jq -r '.nodes[] | select(.name == "w4") | .state')" = unusable ] &&
        [ "$(echo "$st" | jq -r '.nodes[] | select(.name == "w5") | .state')" = unusable ]; then
        ok=1; break
    fi
    sleep 0.1
done
if [ $ok = 1 ]; then
    say ok "w4: $(echo "$st" | jq -r '.nodes[] | select(.name == "w4") | .problem')"
    say ok "w5: $(echo "$st" | jq -r '.nodes[] | select(.name == "w5") | .problem')"
    echo "$st" | jq -r '.nodes[] | select(.name == "w4") | .problem' | grep -q "truncated" ||
        say FAIL "w4's problem does not say truncated"
    echo "$st" | jq -r '.nodes[] | select(.name == "w5") | .problem' | grep -q "cannot be stored" ||
        say FAIL "w5's problem does not say why"
else
    say FAIL "w4/w5 not unusable: $st"
fi
"$DSCTL" status | grep -q "node w4 cannot host units: .*truncated" &&
    say ok "dsctl status prints w4's problem" || say FAIL "dsctl status: $("$DSCTL" status)"
# the coordinator replans once idle (new members); neither unusable node may be in it
sleep 1
for ((i = 0; i < 100; i++)); do
    [ "$("$DSCTL" status --json | jq -r .state)" = serving ] && break
    sleep 0.1
done
[ "$(plan_nodes)" = "coord,w1,w2" ] && say ok "planned around w4 and w5: $(plan_nodes)" ||
    say FAIL "plan nodes $(plan_nodes)"
check_tokens "with unusable members"

# a coordinator whose model does not exist
"$DSD" --node=c2 --role=coordinator --control_bind="tcp://127.0.0.1:$((P + 10))" \
    --client_bind="tcp://127.0.0.1:$((P + 11))" --data_bind="tcp://127.0.0.1:$((P + 12))" \
    --model="$CLUSTER_DIR/no-such-model" --state_dir="$CLUSTER_DIR/c2" --calibrate=false \
    --discover_opencl=false --heartbeat_ms=200 --http_bind= >"$CLUSTER_DIR/c2.log" 2>&1 &
C2_PID=$!
CLUSTER_PIDS+=($C2_PID)
ok=0
for ((i = 0; i < 100; i++)); do
    st=$(DSD_TIMEOUT_MS=1000 "$DSCTL" status --endpoint "tcp://127.0.0.1:$((P + 11))" --json 2>/dev/null)
    echo "$st" | jq -r '.plan_error // ""' 2>/dev/null | grep -q "cannot read the model" && { ok=1; break; }
    sleep 0.1
done
[ $ok = 1 ] && [ "$(echo "$st" | jq -r .state)" = no-plan ] &&
    say ok "missing model: state no-plan, plan_error: $(echo "$st" | jq -r .plan_error)" ||
    say FAIL "missing model: $st"
"$DSCTL" status --endpoint "tcp://127.0.0.1:$((P + 11))" | grep -q "plan error: cannot read the model" &&
    say ok "dsctl status prints the plan error" || say FAIL "dsctl status without the plan error"
# a coordinator whose checkpoint is truncated: it says so instead of serving a broken model
# (on c2's ports, c2 stopped first: the slot's last port is the cluster's HTTP port)
kill "$C2_PID" 2>/dev/null
wait "$C2_PID" 2>/dev/null
"$DSD" --node=c3 --role=coordinator --control_bind="tcp://127.0.0.1:$((P + 10))" \
    --client_bind="tcp://127.0.0.1:$((P + 11))" --data_bind="tcp://127.0.0.1:$((P + 12))" --http_bind= \
    --model="$CLUSTER_DIR/trunc" --state_dir="$CLUSTER_DIR/c3" --calibrate=false \
    --discover_opencl=false --heartbeat_ms=200 >"$CLUSTER_DIR/c3.log" 2>&1 &
CLUSTER_PIDS+=($!)
ok=0
for ((i = 0; i < 100; i++)); do
    st=$(DSD_TIMEOUT_MS=1000 "$DSCTL" status --endpoint "tcp://127.0.0.1:$((P + 11))" --json 2>/dev/null)
    [ "$(echo "$st" | jq -r .state 2>/dev/null)" = no-plan ] && { ok=1; break; }
    sleep 0.1
done
[ $ok = 1 ] && echo "$st" | jq -r .plan_error | grep -q "truncated" &&
    say ok "truncated checkpoint on the coordinator: $(echo "$st" | jq -r .plan_error)" ||
    { say FAIL "truncated checkpoint on the coordinator: $st"; tail -20 "$CLUSTER_DIR/c3.log" >&2; }
exit $fail
