# tests/cluster/lib.sh — start and stop local dsd clusters for the cluster tests and benches.
# Every process started here is recorded and killed by cluster_stop (run from an EXIT trap);
# every wait is bounded.
: "${DS_BUILD:?DS_BUILD must point at the build tree}"
: "${DS_ROOT:?DS_ROOT must point at the source tree}"
DSD="$DS_BUILD/daemon/dsd"
DSCTL="$DS_BUILD/client/dsctl"
CLUSTER_PIDS=()
CLUSTER_DIR=$(mktemp -d /tmp/dsd-cluster.XXXXXX)
# a port block per run so parallel test runs (release + sanitizer builds) do not collide:
# 20000..32767, above the C tests' block (tests/cluster/dsd_spawn.h) and below Linux's
# ephemeral range (32768..), so no outgoing connection can hold one of these ports
BASE_PORT=$((20000 + ($$ % 800) * 16))
HTTP_PORT=$((BASE_PORT + 15)) # the coordinator's HTTP API (docs/http.md)

# cluster_start MODEL N_WORKERS [extra dsd options...]: coordinator + N workers on loopback.
# Heartbeats every 200 ms, a peer failed after 2 s of silence (short enough for the failover
# test, long enough that a loaded CI machine does not fail a busy node).
# CLUSTER_WORKER_ARGS[i] (an indexed array the caller may set): more options for worker i only.
declare -a CLUSTER_WORKER_ARGS
cluster_start() {
    local model=$1 n=$2
    shift 2
    "$DSD" --node=coord --role=coordinator --expect_workers="$n" \
        --control_bind="tcp://127.0.0.1:$BASE_PORT" --client_bind="tcp://127.0.0.1:$((BASE_PORT + 1))" \
        --data_bind="tcp://127.0.0.1:$((BASE_PORT + 2))" --model="$model" \
        --http_bind="127.0.0.1:$HTTP_PORT" --state_dir="$CLUSTER_DIR/coord" --threads=1 --heartbeat_ms=200 --heartbeat_misses=10 --calibrate=false --discover_opencl=false "$@" \
        >"$CLUSTER_DIR/coord.log" 2>&1 &
    CLUSTER_PIDS+=($!)
    local i
    for ((i = 1; i <= n; i++)); do
        "$DSD" --node="w$i" --role=worker --coordinator="tcp://127.0.0.1:$BASE_PORT" \
            --data_bind="tcp://127.0.0.1:$((BASE_PORT + 2 + i))" --model="$model" \
            --state_dir="$CLUSTER_DIR/w$i" --threads=1 --heartbeat_ms=200 --heartbeat_misses=10 --calibrate=false --discover_opencl=false "$@" \
            ${CLUSTER_WORKER_ARGS[$i]:-} \
            >"$CLUSTER_DIR/w$i.log" 2>&1 &
        CLUSTER_PIDS+=($!)
    done
    export DSD_ENDPOINT="tcp://127.0.0.1:$((BASE_PORT + 1))"
    # wait (bounded: 60 s, each poll at most 1 s) until the coordinator serves; give up at once
    # when it has exited (a bind that failed, a bad option)
    local deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        # the cluster's own state, a top-level key (indent 2): the nodes' entries (deeper) say
        # "serving" as soon as each loaded
        if DSD_TIMEOUT_MS=1000 "$DSCTL" status --json 2>/dev/null | grep -q '^  "state": "serving"'; then
            return 0
        fi
        kill -0 "${CLUSTER_PIDS[0]}" 2>/dev/null || { echo "the coordinator exited" >&2; break; }
        sleep 0.1
    done
    echo "cluster did not reach serving; logs:" >&2
    tail -n 20 "$CLUSTER_DIR"/*.log >&2
    return 1
}

# cap_devices PERCENT MODEL_DIR: writes $CLUSTER_DIR/devices.conf capping cpu0 at PERCENT% of
# the checkpoint's bytes (the placement solver then has to split the model) and prints its path.
cap_devices() {
    local bytes
    bytes=$(cat "$2"/*.safetensors | wc -c)
    printf 'device.cpu0.memory_cap = %d\n' $((bytes * $1 / 100)) >"$CLUSTER_DIR/devices.conf"
    echo "$CLUSTER_DIR/devices.conf"
}

need_jq() {
    command -v jq >/dev/null || { echo "jq missing (tools/install-deps.sh installs it)"; exit 1; }
}

cluster_stop() {
    local p
    for p in "${CLUSTER_PIDS[@]}"; do
        kill "$p" 2>/dev/null
    done
    for p in "${CLUSTER_PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    CLUSTER_PIDS=()
}

# After the daemons stopped: a sanitizer report in any log (ASan/UBSan builds print them, and
# LeakSanitizer's at exit) fails the test, whatever it checked.
cluster_sanitizer_check() {
    local bad
    bad=$(grep -l -E "ERROR: (Address|Leak)Sanitizer|runtime error:" "$CLUSTER_DIR"/*.log 2>/dev/null)
    [ -z "$bad" ] && return 0
    echo "FAIL: sanitizer report in $bad:" >&2
    grep -h -A20 -E "ERROR: (Address|Leak)Sanitizer|runtime error:" $bad | head -n 60 >&2
    return 1
}

cluster_cleanup() {
    local rc=$?
    cluster_stop
    cluster_sanitizer_check || rc=1
    rm -rf "$CLUSTER_DIR"
    exit $rc
}
