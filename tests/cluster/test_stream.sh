#!/usr/bin/env bash
# Weight streaming (label `cluster`): worker w2 has no checkpoint copy (its `model` path does not
# exist), so the coordinator streams it exactly the tensors of its units. Checks, against
# sources independent of the streaming code: the cluster's output is token-identical to
# `dsctl generate --local`; the file w2 received is a valid safetensors checkpoint smaller than
# the full one; every tensor in it belongs to a unit that w2's plan.json gives w2 (by the
# Hugging Face tensor naming of DeepSeek-V3 checkpoints), and every expert w2 hosts has its
# three weights there.
set -u
. "$(dirname "$0")/lib.sh"
trap cluster_cleanup EXIT
need_jq
fail=0
M="$DS_ROOT/models/tiny"
bytes=$(cat "$M"/*.safetensors | wc -c)
# 45% caps: the model must be split over the three nodes, so w2 gets units
cap_devices 45 "$M" >/dev/null
CLUSTER_WORKER_ARGS[2]="--model=$CLUSTER_DIR/no-copy-here"
cluster_start "$M" 2 --devices_config="$CLUSTER_DIR/devices.conf" --plan_context=64 ||
    { tail -n 20 "$CLUSTER_DIR"/*.log; exit 1; }
grep -q "no checkpoint copy: streaming its units" "$CLUSTER_DIR/coord.log" ||
    { echo "FAIL: the coordinator did not stream w2's units"; fail=1; }
for p in "5,6,7" "10,20,30,40,50"; do
    want=$("$DSCTL" generate --local --model "$M" --tokens "$p" --max-tokens 12 --threads 1 | tail -n1)
    got=$(timeout 60 "$DSCTL" submit --tokens "$p" --max-tokens 12 | tail -n1)
    if [ "$want" = "$got" ] && [ -n "$want" ]; then echo "ok   prompt $p: $got"; else
        echo "FAIL prompt $p: local '$want' cluster '$got'"; fail=1; fi
done
st="$CLUSTER_DIR/w2/stream/model.safetensors"
if [ ! -f "$st" ] || [ ! -f "$CLUSTER_DIR/w2/stream/config.json" ]; then
    echo "FAIL: w2 has no streamed checkpoint"; exit 1
fi
size=$(stat -c %s "$st")
echo "w2 received $size bytes of a $bytes-byte checkpoint"
[ "$size" -lt "$bytes" ] || { echo "FAIL: w2 received the whole model"; fail=1; }
cmp -s "$CLUSTER_DIR/w2/stream/config.json" "$M/config.json" || { echo "FAIL: config.json differs"; fail=1; }
# the safetensors header: u64 little-endian length, then JSON
hlen=$(od -An -t u8 -N 8 "$st" | tr -d ' ')
tail -c +9 "$st" | head -c "$hlen" >"$CLUSTER_DIR/header.json"
jq -r 'keys[] | select(. != "__metadata__")' "$CLUSTER_DIR/header.json" | sort >"$CLUSTER_DIR/got.txt"
plan="$CLUSTER_DIR/w2/plan.json"
# the unit a tensor name belongs to (HF DeepSeek naming)
unit_of() {
    case "$1" in
    model.embed_tokens.*) echo embed ;;
    model.norm.* | lm_head.*) echo head ;;
    model.layers.*.mlp.experts.*)
        l=${1#model.layers.}; l=${l%%.*}; e=${1#model.layers.$l.mlp.experts.}; e=${e%%.*}
        echo "expert[$l][$e]" ;;
    model.layers.*)
        l=${1#model.layers.}; l=${l%%.*}; echo "attn[$l]" ;;
    *) echo "?" ;;
    esac
}
n=0
while read -r t; do
    u=$(unit_of "$t")
    # the unit's node, or w2 when w2 holds an extra copy of it (a replicated hot expert)
    node=$(jq -r --arg u "$u" 'if ((.replicas[$u] // []) | index("w2")) then "w2"
                               else (.units[$u] // "none") end' "$plan")
    if [ "${node%%/*}" != w2 ]; then echo "FAIL: streamed $t ($u) but $u is on $node"; fail=1; fi
    n=$((n + 1))
done <"$CLUSTER_DIR/got.txt"
echo "w2's streamed checkpoint: $n tensors, each of a unit w2 hosts"
[ "$n" -gt 0 ] || { echo "FAIL: no tensors streamed"; fail=1; }
for u in $( (jq -r '.units | to_entries[] | select((.value | split("/")[0]) == "w2") | .key' "$plan"
            jq -r '(.replicas // {}) | to_entries[] | select(.value | index("w2")) | .key' "$plan") |
          grep '^expert'); do
    l=${u#expert[}; l=${l%%]*}; e=${u##*][}; e=${e%]}
    for w in gate_proj up_proj down_proj; do
        grep -qx "model.layers.$l.mlp.experts.$e.$w.weight" "$CLUSTER_DIR/got.txt" ||
            { echo "FAIL: $u hosted on w2 but its $w is missing"; fail=1; }
    done
done
[ $fail -eq 0 ] && echo PASS || tail -n 20 "$CLUSTER_DIR"/*.log
exit $fail
