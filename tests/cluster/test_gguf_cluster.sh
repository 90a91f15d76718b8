#!/usr/bin/env bash
# GGUF cluster test (label `cluster`): coordinator + 2 workers on a llama.cpp Q4_K_M file
# (tests/data/gguf_ref/tiny-Q4_K_M.gguf: Q4_K, Q5_0, Q5_1, Q6_K and F32 tensors), each node
# capped at 45% of the file so the placement solver must split it over all three; worker w2 has
# no copy of the file, so the coordinator streams it its units' tensors in their quantised
# types. Checked against sources independent of the streaming code: greedy tokens identical to
# `dsctl generate --local` on the same file; the GGUF w2 received holds only tensors of units
# its plan.json gives it (by llama.cpp's tensor naming), every expert it hosts has its layer's
# stacked tensors, and fewer bytes crossed the link than the file holds. Then `quantize = q4_k`
# on models/tiny: the plan carries it to every node, token-identical to --local --quantize.
set -u
. "$(dirname "$0")/lib.sh"
trap cluster_cleanup EXIT
need_jq
fail=0
M="$DS_ROOT/tests/data/gguf_ref/tiny-Q4_K_M.gguf"
bytes=$(stat -c %s "$M")
printf 'device.cpu0.memory_cap = %d\n' $((bytes * 45 / 100)) >"$CLUSTER_DIR/devices.conf"
CLUSTER_WORKER_ARGS[2]="--model=$CLUSTER_DIR/no-copy-here.gguf"
cluster_start "$M" 2 --devices_config="$CLUSTER_DIR/devices.conf" --plan_context=64 ||
    { tail -n 20 "$CLUSTER_DIR"/*.log; exit 1; }
plan=$("$DSCTL" placement --json)
solver=$(echo "$plan" | jq -r '.plan.solver // empty')
echo "cap $((bytes * 45 / 100)) B/node of a $bytes-byte GGUF, solver '$solver'"
{ [ -n "$solver" ] && [ "$solver" != round-robin ]; } ||
    { echo "FAIL: plan solver is '$solver', not the placement solver"; fail=1; }
for node in coord w1 w2; do
    n=$(echo "$plan" | jq --arg n "$node" '[.plan.units | to_entries[] | select((.key | test("^(attn|expert)")) and ((.value | split("/")[0]) == $n))] | length')
    echo "  $node hosts $n attn/expert units"
    [ "$n" -gt 0 ] || { echo "FAIL: $node hosts no attention layer and no expert"; fail=1; }
done
line=$(grep -m1 "node w2 has no checkpoint copy: streaming its units" "$CLUSTER_DIR/coord.log")
[ -n "$line" ] || { echo "FAIL: the coordinator did not stream w2's units"; fail=1; }
for p in "5,6,7" "10,20,30,40,50" "200,3,3,3,1"; do
    want=$("$DSCTL" generate --local --model "$M" --tokens "$p" --max-tokens 12 --threads 1 | tail -n1)
    got=$(timeout 60 "$DSCTL" submit --tokens "$p" --max-tokens 12 | tail -n1)
    if [ "$want" = "$got" ] && [ -n "$want" ]; then echo "ok   prompt $p: $got"; else
        echo "FAIL prompt $p: local '$want' cluster '$got'"; fail=1; fi
done
g="$CLUSTER_DIR/w2/stream/model.gguf"
[ -f "$g" ] || { echo "FAIL: w2 has no streamed model.gguf"; exit 1; }
# wire bytes (the log's MiB) against the file: the slices of experts hosted elsewhere are not sent
wire=$(echo "$line" | grep -o '([0-9.]* MiB)' | tr -d '(MiB )')
echo "w2 received ${wire} MiB over the link for a $(stat -c %s "$g")-byte file (${bytes} bytes in the full model)"
awk -v w="$wire" -v b="$bytes" 'BEGIN { exit !(w * 1048576 < b) }' ||
    { echo "FAIL: w2 was sent as much as the whole model"; fail=1; }
# tensor names in the received GGUF (its header's tensor infos)
grep -aoE '(blk\.[0-9]+\.[a-z_]+|token_embd|output_norm|output)\.(weight|bias)' "$g" | sort -u >"$CLUSTER_DIR/got.txt"
wplan="$CLUSTER_DIR/w2/plan.json"
hosts() { # unit -> true when w2 hosts it (primary or copy)
    jq -e --arg u "$1" '((.units[$u] // "") | split("/")[0]) == "w2" or ((.replicas[$u] // []) | index("w2"))' "$wplan" >/dev/null
}
n=0
while read -r t; do
    case "$t" in
    blk.*_exps.weight)
        l=${t#blk.}; l=${l%%.*}
        jq -e --arg l "$l" '[.units | to_entries[] | select((.key | startswith("expert[" + $l + "]")) and ((.value | split("/")[0]) == "w2"))] | length > 0' "$wplan" >/dev/null ||
            jq -e --arg l "$l" '[(.replicas // {}) | to_entries[] | select((.key | startswith("expert[" + $l + "]")) and (.value | index("w2")))] | length > 0' "$wplan" >/dev/null ||
            { echo "FAIL: streamed $t but w2 hosts no expert of layer $l"; fail=1; } ;;
    blk.*)
        l=${t#blk.}; l=${l%%.*}
        hosts "attn[$l]" || { echo "FAIL: streamed $t but attn[$l] is not on w2"; fail=1; } ;;
    *) echo "FAIL: streamed $t (embed/head stay on the coordinator)"; fail=1 ;;
    esac
    n=$((n + 1))
done <"$CLUSTER_DIR/got.txt"
echo "w2's streamed GGUF: $n tensors, each of a unit w2 hosts"
[ "$n" -gt 0 ] || { echo "FAIL: no tensors streamed"; fail=1; }
for u in $( (jq -r '.units | to_entries[] | select((.value | split("/")[0]) == "w2") | .key' "$wplan"
            jq -r '(.replicas // {}) | to_entries[] | select(.value | index("w2")) | .key' "$wplan") |
          grep '^expert'); do
    l=${u#expert[}; l=${l%%]*}
    for w in gate up down; do
        grep -qx "blk.$l.ffn_${w}_exps.weight" "$CLUSTER_DIR/got.txt" ||
            { echo "FAIL: $u hosted on w2 but blk.$l.ffn_${w}_exps is missing"; fail=1; }
    done
done

# ---- load-time quantisation in the cluster: models/tiny (BF16) with quantize = q4_k on the
# coordinator, carried to the workers by the plan (w1 is told quantize=none itself and must
# follow the plan; w2 gets the BF16 tensors streamed and quantises them at load), each node
# capped at 22% of the BF16 checkpoint (about half of it in Q4_K) so the plan splits it;
# tokens identical to `dsctl generate --local --quantize q4_k`, on prompts where they differ
# from the unquantised model's (so a node that did not quantise would show).
cluster_stop
mkdir -p "$CLUSTER_DIR/gguf" && mv "$CLUSTER_DIR"/*.log "$CLUSTER_DIR/gguf/"
rm -f "$CLUSTER_DIR"/*/plan.json # the first cluster's
T="$DS_ROOT/models/tiny"
tb=$(cat "$T"/*.safetensors | wc -c)
printf 'device.cpu0.memory_cap = %d\n' $((tb * 22 / 100)) >"$CLUSTER_DIR/devices.conf"
CLUSTER_WORKER_ARGS[1]="--quantize=none"
CLUSTER_WORKER_ARGS[2]="--model=$CLUSTER_DIR/no-copy-here"
cluster_start "$T" 2 --devices_config="$CLUSTER_DIR/devices.conf" --plan_context=64 --quantize=q4_k ||
    { tail -n 20 "$CLUSTER_DIR"/*.log; exit 1; }
# (cluster_start may return as soon as one node reports serving: wait, bounded, for w1's load)
for _ in $(seq 100); do [ -s "$CLUSTER_DIR/w1/plan.json" ] && break; sleep 0.1; done
[ "$(jq -r '.quantize // "none"' "$CLUSTER_DIR/w1/plan.json")" = q4_k ] ||
    { echo "FAIL: w1's plan does not carry quantize = q4_k"; fail=1; }
grep -q "node w2 has no checkpoint copy: streaming its units" "$CLUSTER_DIR/coord.log" ||
    { echo "FAIL: the coordinator did not stream w2's units"; fail=1; }
for node in w1 w2; do # (the coordinator's cap goes mostly to embed and head)
    n=$("$DSCTL" placement --json | jq --arg n "$node" '[.plan.units | to_entries[] | select((.key | test("^(attn|expert)")) and ((.value | split("/")[0]) == $n))] | length')
    [ "$n" -gt 0 ] || { echo "FAIL: quantised tiny: $node hosts no attention layer and no expert"; fail=1; }
done
differ=0
for p in "10,20,30,40,50" "1" "100,200,300" "42,43"; do
    want=$("$DSCTL" generate --local --model "$T" --quantize q4_k --tokens "$p" --max-tokens 16 --threads 1 | tail -n1)
    plain=$("$DSCTL" generate --local --model "$T" --tokens "$p" --max-tokens 16 --threads 1 | tail -n1)
    got=$(timeout 60 "$DSCTL" submit --tokens "$p" --max-tokens 16 | tail -n1)
    if [ "$want" = "$got" ] && [ -n "$want" ]; then echo "ok   quantize q4_k, prompt $p: $got"; else
        echo "FAIL quantize q4_k, prompt $p: local '$want' cluster '$got'"; fail=1; fi
    [ "$plain" != "$want" ] && differ=$((differ + 1))
done
echo "the unquantised model gives other tokens on $differ of 4 prompts"
[ "$differ" -gt 0 ] || { echo "FAIL: no prompt tells the quantised model from the unquantised one"; fail=1; }
[ $fail -eq 0 ] && echo PASS || tail -n 20 "$CLUSTER_DIR"/*.log "$CLUSTER_DIR"/gguf/*.log
exit $fail
