#!/usr/bin/env bash
# dsctl test (label `cluster`): every dsctl command's output checked against a source of truth
# that dsctl does not produce — the processes this script started, the plan.json each node
# writes to its state_dir, the devices config this script wrote, `dsctl generate --local`,
# the model's config.json, hwloc's topology and the cluster file given to `dsctl plan`, and the
# exit codes of docs/client.md. One cluster (coordinator + 2 workers on models/tiny, each capped
# at 70 % of the checkpoint so that no node holds the model alone but any two do: the plan
# splits, and draining a worker still leaves a feasible plan). One "ok:"/"FAIL:" line per check.
set -u
here=$(dirname "$0")
. "$here/lib.sh"
. "$here/lib_dsctl.sh"
trap cluster_cleanup EXIT
command -v jq >/dev/null || { echo "FAIL: jq is missing (tools/install-deps.sh installs it)"; exit 1; }

MODEL="$DS_ROOT/models/tiny"
NODES=(coord w1 w2)
WANT_NODES=$(printf '%s\n' "${NODES[@]}" | sort)
bytes=$(cat "$MODEL"/*.safetensors | wc -c)
CAP=$((bytes * 70 / 100))
printf 'device.cpu0.memory_cap = %d\n' "$CAP" >"$CLUSTER_DIR/devices.conf"
cluster_start "$MODEL" 2 --devices_config="$CLUSTER_DIR/devices.conf" --plan_context=64 || exit 1
plan_of() { echo "$CLUSTER_DIR/$1/plan.json"; }
status_field() { "$DSCTL" status --json | jq -r "$1"; }
# serving_at V: the coordinator serves plan version V
serving_at() { [ "$(status_field '"\(.state) \(.plan_version)"')" = "serving $1" ]; }

# ---- status -----------------------------------------------------------------------------
st=$("$DSCTL" status --json)
check_eq "status --json: node names are the started processes" "$WANT_NODES" \
    "$(echo "$st" | jq -r '.nodes[].name' | sort)"
check_eq "status --json: coordinator" coord "$(echo "$st" | jq -r .coordinator)"
check_eq "status --json: roles" "coord coordinator,w1 worker,w2 worker" \
    "$(echo "$st" | jq -r '.nodes[] | "\(.name) \(.role)"' | sort | paste -sd,)"
check_eq "status --json: cluster and every node serving, none drained" "serving 3 3 0" \
    "$(echo "$st" | jq -r '"\(.state) \(.nodes | length) \([.nodes[] | select(.state == "serving")] | length) \([.nodes[] | select(.drained)] | length)"')"
V0=$(echo "$st" | jq -r .plan_version)
for n in "${NODES[@]}"; do
    check_eq "status plan_version == $n's plan.json version" "$V0" "$(jq -r .version "$(plan_of "$n")" 2>&1)"
done
human=$("$DSCTL" status)
check_eq "status (human): header" "coord serving v$V0" \
    "$(echo "$human" | awk 'NR == 1 { print $4, $6, $8 }')"
check_eq "status (human) rows == --json (name role state drained)" \
    "$(echo "$st" | jq -r '.nodes[] | "\(.name) \(.role) \(.state) \(if .drained then "yes" else "no" end)"' | sort)" \
    "$(echo "$human" | awk 'NR > 2 { print $1, $2, $3, $4 }' | sort)"

# ---- placement --------------------------------------------------------------------------
pj=$("$DSCTL" placement --json)
map=$(echo "$pj" | placement_json_units)
# truth: what each node's own plan.json says is on that node, united over the nodes
truth=$(for n in "${NODES[@]}"; do plan_file_units "$(plan_of "$n")" "$n"; done | sort)
check_eq "placement --json units == union of each node's plan.json (its own units)" "$truth" "$map"
for n in "${NODES[@]}"; do
    extra=$(comm -23 <(plan_file_units "$(plan_of "$n")") <(echo "$map"))
    check_eq "$n's plan.json has no entry that placement contradicts" "" "$extra"
done
check_eq "placement --json plan.version == plan_version" "$V0" "$(echo "$pj" | jq -r .plan.version)"
hosts=$(echo "$map" | awk '{ print $2 }' | sort -u | paste -sd' ')
if [ "$(echo "$hosts" | wc -w)" -ge 2 ]; then
    ok "plan splits the model over nodes ($hosts)"
else
    fail "plan does not split the model (hosts: $hosts)"
fi
table_map=$("$DSCTL" placement | placement_table_units)
rmap=$(echo "$pj" | placement_json_table_units) # with "+copy" for replicated experts
check_eq "placement (human table) == --json (embed, head, attn, experts, copies)" \
    "$(echo "$rmap" | grep -E '^(embed|head|attn\[[0-9]+\]|expert\[[0-9]+\]\[[0-9]+\]) ')" "$table_map"
# a MoE layer (has experts) for --layer
L=$(echo "$map" | sed -n 's/^expert\[\([0-9]*\)\].*/\1/p' | sort -n | head -n1)
layer_out=$("$DSCTL" placement --layer "$L")
check_eq "placement --layer $L prints one layer row" "$L" "$(echo "$layer_out" | awk '/^[0-9]+ / { print $1 }')"
layer_map=$(echo "$layer_out" | placement_table_units | grep -v -E '^(embed|head) ')
check_eq "placement --layer $L shows only layer $L, as --json" \
    "$(echo "$rmap" | grep -E "^(attn\[$L\]|expert\[$L\]\[[0-9]+\]) ")" "$layer_map"
for u in "attn[1]" "expert[$L][0]"; do
    want=$(jq -r --arg u "$u" '.units[$u]' "$(plan_of coord)")
    check_eq "placement --unit $u --json names the node plan.json says" "$u $want" \
        "$("$DSCTL" placement --unit "$u" --json | jq -r '"\(.unit) \(.node)"')"
    check_eq "placement --unit $u (human) names the same node" "$want" \
        "$("$DSCTL" placement --unit "$u" | awk '$2 == "->" { print $3 }')"
done
check_rc "placement --unit of no unit: not found" 3 "$DSCTL" placement --unit 'attn[999]'

# ---- cluster ----------------------------------------------------------------------------
cj=$("$DSCTL" cluster --json)
check_eq "cluster --json: exactly the started nodes" "$WANT_NODES" \
    "$(echo "$cj" | jq -r '.nodes[].name' | sort)"
check_eq "cluster --json: every node has devices" 0 \
    "$(echo "$cj" | jq '[.nodes[] | select((.devices | length) == 0)] | length')"
check_eq "cluster --json: cpu0 memory == the devices config cap on every node" \
    "$CAP $CAP $CAP" "$(echo "$cj" | jq -r '[.nodes[].devices[] | select(.name == "cpu0") | .memory_bytes] | map(tostring) | join(" ")')"
bad_links=$(echo "$cj" | jq -r --arg nodes "${NODES[*]}" '($nodes | split(" ")) as $n
    | .links[]? | select((.a | IN($n[])) and (.b | IN($n[])) and .a != .b | not) | "\(.a)-\(.b)"')
check_eq "cluster --json: links ($(echo "$cj" | jq '.links | length')) only between distinct listed nodes" "" "$bad_links"

# ---- generate: cluster == --local ---------------------------------------------------------
for p in "5,6,7" "10,20,30,40,50,60,70,80,90,100,110"; do
    want=$("$DSCTL" generate --local --model "$MODEL" --tokens "$p" --max-tokens 10 --threads 1 | tail -n1)
    got=$(timeout 60 "$DSCTL" generate --tokens "$p" --max-tokens 10 | tail -n1)
    if [ -n "$want" ]; then
        check_eq "generate prompt $p: cluster == --local" "$want" "$got"
    else
        fail "generate --local prompt $p printed nothing"
    fi
done

# ---- jobs, and replan refused while jobs run ---------------------------------------------
f0=$("$DSCTL" jobs --json | jq -r .finished)
check_eq "jobs --json: no job before the long jobs" 0 "$("$DSCTL" jobs --json | jq '.jobs | length')"
LONG_PROMPTS=("3,4,5,6" "7,8" "9,10,11,12,13,14,15")
LONG_MAX=480 # prompt + max stays inside the tiny model's 512-token context
long_pids=()
for i in "${!LONG_PROMPTS[@]}"; do
    timeout 60 "$DSCTL" generate --tokens "${LONG_PROMPTS[$i]}" --max-tokens $LONG_MAX \
        >"$CLUSTER_DIR/long.$i" 2>&1 &
    long_pids+=($!)
done
all_listed() {
    "$DSCTL" jobs --json >"$CLUSTER_DIR/jobs.json" 2>/dev/null &&
        [ "$(jq '.jobs | length' "$CLUSTER_DIR/jobs.json")" -eq ${#LONG_PROMPTS[@]} ]
}
if wait_until 100 all_listed; then
    # first, while they surely run: replan must be refused (docs/client.md: exit 1)
    check_rc "replan while jobs run: refused" 1 "$DSCTL" replan
    check_eq "refused replan left plan_version" "$V0" "$(status_field .plan_version)"
    want_jobs=$(for p in "${LONG_PROMPTS[@]}"; do echo "$(echo "$p" | tr ',' '\n' | wc -l) $LONG_MAX"; done | sort)
    check_eq "jobs --json lists each running job with its prompt length and max" "$want_jobs" \
        "$(jq -r '.jobs[] | "\(.prompt_tokens) \(.max_tokens)"' "$CLUSTER_DIR/jobs.json" | sort)"
else
    fail "jobs --json never listed the ${#LONG_PROMPTS[@]} running jobs ($(head -c 300 "$CLUSTER_DIR/jobs.json" | tr '\n' ' '))"
fi
long_ok=0
for i in "${!long_pids[@]}"; do
    wait "${long_pids[$i]}" && [ "$(tail -n1 "$CLUSTER_DIR/long.$i" | tr ',' '\n' | wc -l)" -eq $LONG_MAX ] &&
        long_ok=$((long_ok + 1))
done
check_eq "long jobs finished with $LONG_MAX tokens each" ${#LONG_PROMPTS[@]} $long_ok
jf=$("$DSCTL" jobs --json)
check_eq "jobs --json after: no job, finished grew by ${#LONG_PROMPTS[@]}" "0 $((f0 + ${#LONG_PROMPTS[@]}))" \
    "$(echo "$jf" | jq -r '"\(.jobs | length) \(.finished)"')"
check_eq "jobs (human) summary == --json" \
    "running 0, finished $(echo "$jf" | jq .finished)," "$("$DSCTL" jobs | tail -n1 | cut -d' ' -f1-4)"

# ---- drain / replan / undrain ------------------------------------------------------------
# the worker hosting the most units (the coordinator keeps embed and head)
victim=$(echo "$map" | awk '$2 != "coord" { print $2 }' | sort | uniq -c | sort -rn | awk 'NR == 1 { print $2 }')
[ -n "$victim" ] || victim=w1
check_rc "drain $victim" 0 "$DSCTL" drain "$victim"
check_eq "status --json: only $victim drained" "$victim" \
    "$(status_field '[.nodes[] | select(.drained) | .name] | join(" ")')"
check_eq "status (human): $victim DRAINED yes" yes \
    "$("$DSCTL" status | awk -v n="$victim" 'NR > 2 && $1 == n { print $4 }')"
V1=$((V0 + 1))
check_eq "replan after drain: plan_version $V1" "$V1" "$("$DSCTL" replan --json | jq -r .plan_version)"
if wait_until 100 serving_at "$V1"; then
    ok "serving plan v$V1"
else
    fail "not serving v$V1: $(status_field '"\(.state) \(.plan_version) \(.plan_error // "")"')"
fi
check_eq "coordinator's plan.json version" "$V1" "$(jq -r .version "$(plan_of coord)")"
map1=$("$DSCTL" placement --json | placement_json_units)
check_eq "placement after replan == coordinator's plan.json" "$(plan_file_units "$(plan_of coord)")" "$map1"
check_eq "no unit on drained $victim (placement, plan.json)" "0 0" \
    "$(echo "$map1" | grep -c " $victim$") $(plan_file_units "$(plan_of coord)" "$victim" | grep -c .)"
p=5,6,7
check_eq "generate without $victim: cluster == --local" \
    "$("$DSCTL" generate --local --model "$MODEL" --tokens $p --max-tokens 8 --threads 1 | tail -n1)" \
    "$(timeout 60 "$DSCTL" generate --tokens $p --max-tokens 8 | tail -n1)"
check_rc "undrain $victim" 0 "$DSCTL" undrain "$victim"
check_eq "status --json: no node drained" "" "$(status_field '[.nodes[] | select(.drained) | .name] | join(" ")')"
V2=$((V1 + 1))
check_eq "replan after undrain: plan_version $V2" "$V2" "$("$DSCTL" replan --json | jq -r .plan_version)"
if wait_until 100 serving_at "$V2"; then ok "serving plan v$V2"; else fail "not serving v$V2"; fi
check_eq "coordinator's plan.json version" "$V2" "$(jq -r .version "$(plan_of coord)")"
map2=$("$DSCTL" placement --json | placement_json_units)
check_eq "placement after undrain == coordinator's plan.json" "$(plan_file_units "$(plan_of coord)")" "$map2"
n_back=$(echo "$map2" | grep -c " $victim$")
if [ "$n_back" -gt 0 ]; then
    ok "units back on $victim ($n_back)"
else
    fail "no unit back on $victim after undrain + replan"
fi
check_rc "drain of no node: not found" 3 "$DSCTL" drain no-such-node

# ---- devices (local discovery, no daemon) ------------------------------------------------
n_cpu=$("$DSCTL" devices --json --no-measure | jq '[.discovered[] | select(.source == "cpu")] | length')
check_eq "devices --json: cpu devices == hwloc NUMA nodes with cores" "$(hwloc_cpu_domains)" "$n_cpu"
if sysfs=$(sysfs_cpu_nodes); then
    check_eq "devices --json: cpu devices == /sys NUMA nodes with CPUs" "$sysfs" "$n_cpu"
fi
xml="$DS_ROOT/tests/data/hwloc/2pack4numa.xml"
check_eq "devices --json --hwloc-xml 2pack4numa: cpu devices == NUMA nodes in the XML" \
    "$(hwloc_cpu_domains "$xml")" \
    "$("$DSCTL" devices --json --no-measure --hwloc-xml "$xml" | jq '[.discovered[] | select(.source == "cpu")] | length')"

# ---- plan (offline) ----------------------------------------------------------------------
CL="$DS_ROOT/bench/clusters/memory-starved-v3.json"
CFG="$DS_ROOT/tests/data/configs/deepseek-v3"
if "$DSCTL" plan --cluster "$CL" --model "$CFG" --json >"$CLUSTER_DIR/plan.json" 2>"$CLUSTER_DIR/plan.err"; then
    placed=$(jq -r '.units[] | select(.replica == 0) | .unit' "$CLUSTER_DIR/plan.json" | sort)
    check_eq "plan: every unit of the model placed exactly once ($(model_units "$CFG/config.json" | wc -l) units)" \
        "$(model_units "$CFG/config.json")" "$placed"
    check_eq "plan: replicas only of placed experts" "" \
        "$(comm -13 <(echo "$placed") <(jq -r '.units[] | select(.replica > 0) | .unit' "$CLUSTER_DIR/plan.json" | sort -u))"
    # device -> memory in the cluster file, against what the plan uses on it
    over=$(jq -r --slurpfile c "$CL" '
        ([$c[0].nodes[] | .name as $n | .devices[] | {key: "\($n)/\(.name)", value: .memory_bytes}]
         | from_entries) as $mem
        | (reduce .units[] as $u ({}; .[$u.device] += $u.bytes)) as $w
        | .devices[]
        | select($mem[.device] == null or .bytes_used > $mem[.device] or ($w[.device] // 0) > .bytes_used)
        | "\(.device) used \(.bytes_used) weights \($w[.device] // 0) memory \($mem[.device])"' "$CLUSTER_DIR/plan.json")
    check_eq "plan: per device weights <= bytes_used <= memory in $(basename "$CL")" "" "$over"
else
    fail "dsctl plan $(basename "$CL") failed: $(head -c 300 "$CLUSTER_DIR/plan.err")"
fi

# ---- exit codes (docs/client.md: 1 failure/unreachable, 2 usage, 3 not found) --------------
check_rc "unknown command: usage" 2 "$DSCTL" no-such-command
check_rc "unknown global option: usage" 2 "$DSCTL" --no-such-option status
check_rc "status bad option: usage" 2 "$DSCTL" status --no-such-option
check_rc "placement bad --layer: usage" 2 "$DSCTL" placement --layer x
check_rc "drain without NODE: usage" 2 "$DSCTL" drain
# a port of this run's block that nothing listens on
for cmd in status placement; do
    check_rc "$cmd on an unreachable endpoint: failure" 1 env DSD_TIMEOUT_MS=1500 \
        DSD_ENDPOINT="tcp://127.0.0.1:$((BASE_PORT + 14))" timeout 30 "$DSCTL" $cmd
done

if [ "$DSCTL_FAILS" -eq 0 ]; then
    echo "PASS"
    exit 0
fi
echo "$DSCTL_FAILS check(s) failed; logs:"
tail -n 20 "$CLUSTER_DIR"/*.log
exit 1
