# tests/cluster/lib_dsctl.sh — helpers for test_dsctl.sh: one "ok:"/"FAIL:" line per check,
# shellcheck shell=bash
# bounded waits, and the independent sources of truth a dsctl output is compared against
# (the plan.json each node writes, the model's config.json, hwloc's topology, cluster files).
# Everything here reads JSON with jq and only the keys documented in docs/*.md.
DSCTL_FAILS=0

ok() { echo "ok: $*"; }
fail() {
    echo "FAIL: $*"
    DSCTL_FAILS=$((DSCTL_FAILS + 1))
}

# check_eq NAME WANT GOT: one line; on a mismatch both values (first lines) are shown.
check_eq() {
    if [ "$2" = "$3" ]; then
        ok "$1"
    else
        fail "$1: want '$(echo "$2" | head -c 300 | tr '\n' ' ')' got '$(echo "$3" | head -c 300 | tr '\n' ' ')'"
    fi
}

# check_rc NAME WANT CMD...: runs CMD (output to $CLUSTER_DIR/last.out/.err) and compares its
# exit status with WANT; a 0 where WANT is not 0 is always a failure.
check_rc() {
    local name=$1 want=$2 rc
    shift 2
    "$@" >"$CLUSTER_DIR/last.out" 2>"$CLUSTER_DIR/last.err"
    rc=$?
    if [ "$rc" -eq "$want" ]; then
        ok "$name (exit $rc)"
    else
        fail "$name: exit $rc, want $want ($(head -c 200 "$CLUSTER_DIR/last.err" | tr '\n' ' '))"
    fi
}

# wait_until TRIES CMD...: runs CMD every 0.1 s until it succeeds, at most TRIES times.
wait_until() {
    local tries=$1 i
    shift
    for ((i = 0; i < tries; i++)); do
        "$@" && return 0
        sleep 0.1
    done
    return 1
}

# plan_file_units FILE [NODE]: "unit node" lines (sorted) of a daemon plan.json (`units`
# object), only the units on NODE when given.
plan_file_units() {
    jq -r --arg n "${2:-}" '.units | to_entries[] | select($n == "" or .value == $n)
        | "\(.key) \(.value)"' "$1" | sort
}

# placement_json_units: stdin `dsctl placement --json` -> sorted "unit node" lines.
placement_json_units() {
    jq -r '.plan.units | to_entries[] | "\(.key) \(.value)"' | sort
}

# placement_json_table_units: stdin `dsctl placement --json` -> sorted "unit node" lines, the
# node followed by "/device" for an expert on an accelerator and "+node" for every extra copy
# of a replicated expert, as the table prints it.
placement_json_table_units() {
    jq -r '.plan as $p | $p.units | to_entries[]
           | "\(.key) \(.value)\(if ($p.devices // {})[.key] then "/" + $p.devices[.key] else "" end)\(($p.replicas // {})[.key] // [] | map("+" + .) | join(""))"' | sort
}

# placement_table_units: stdin the human `dsctl placement` table -> sorted "unit node" lines
# for embed, head, attn[l] and expert[l][e] (what the table shows).
placement_table_units() {
    awk '
        /^plan v[0-9]+ / { for (i = 1; i <= NF; i++) if ($(i + 1) == "->") print $i, $(i + 2) }
        /^LAYER / { in_layers = 1; next }
        in_layers && NF == 0 { in_layers = 0 }
        in_layers {
            # LAYER ATTENTION <ms> ms/call e:node... | (dense)
            printf "attn[%s] %s\n", $1, $2
            for (i = 5; i <= NF; i++) {
                if ($i == "(dense)") continue
                split($i, p, ":")
                printf "expert[%s][%s] %s\n", $1, p[1], p[2]
            }
        }' | sort
}

# model_units CONFIG: the sorted unit names the placement solver must place for a
# DeepSeek-V3-family config.json (docs/plan-format.md: embed, attn[l], dense[l] for the first
# first_k_dense_replace layers, shared[l] and expert[l][e] on the MoE layers, head).
model_units() {
    jq -r '. as $c | ($c.first_k_dense_replace // 0) as $k | ($c.moe_layer_freq // 1) as $f
        | ["embed", "head"]
        + [range(0; $c.num_hidden_layers) | "attn[\(.)]"]
        + [range(0; $c.num_hidden_layers) | . as $l
           | if $l < $k or (($l - $k) % $f) != 0 then "dense[\($l)]"
             else (if ($c.n_shared_experts // 0) > 0 then "shared[\($l)]" else empty end),
                  (range(0; $c.n_routed_experts) | "expert[\($l)][\(.)]")
             end]
        | .[]' "$1" | sort
}

# hwloc_cpu_domains [XML]: how many cpu devices docs/devices.md's rule gives for a topology
# (this machine's, or an hwloc XML file): one per NUMA node that has cores (a non-empty
# cpuset), or one per package when the topology has no NUMA node.
hwloc_cpu_domains() {
    local xml n
    if [ -n "${1:-}" ]; then
        xml=$(lstopo-no-graphics --input "$1" --of xml 2>/dev/null)
    else
        xml=$(lstopo-no-graphics --of xml 2>/dev/null)
    fi
    n=$(echo "$xml" | grep '<object type="NUMANode"' | grep -vc 'cpuset="0x0*"')
    [ "$n" -gt 0 ] || n=$(echo "$xml" | grep -c '<object type="Package"')
    echo "$n"
}

# sysfs_cpu_nodes: NUMA nodes with CPUs per /sys/devices/system/node/has_cpu ("0-1,3" -> 3).
sysfs_cpu_nodes() {
    local list n=0 r
    list=$(cat /sys/devices/system/node/has_cpu 2>/dev/null) || return 1
    for r in ${list//,/ }; do
        if [[ $r == *-* ]]; then n=$((n + ${r#*-} - ${r%-*} + 1)); else n=$((n + 1)); fi
    done
    echo "$n"
}
