#!/usr/bin/env bash
# bench_vs_llama.sh — dsd's engine beside llama.cpp on the same weights, threads and machine.
#
# Makes (once, cached in build-bench/) bench_engine's 1.3 GB DeepSeek-V2-shaped BF16 checkpoint
# and its GGUF from llama.cpp's own converter (BF16, no requantisation), then for each thread
# count, interleaved (dsd, llama.cpp, dsd, llama.cpp, ...), times a 128-token prefill and 64
# tokens of batch-1 decode: dsd with build/bench/bench_engine, llama.cpp with llama-bench
# (-p 128 -n 64 -r 3). Both report the mean tokens/s of 3 repeats after a warm-up. Prints a
# table with the ratios, each engine's decode GB/s (the same bytes/token for both) and the read
# bandwidth bench_engine measured in that run. Raw outputs are kept in build-bench/results/.
#
#   bench/bench_vs_llama.sh [--threads "1 2"] [--rounds N] [--idle-wait S] [--rebuild]
#                           [--bin PATH] [--skip-without-llama] [--shape v2-1.3g|v2-4g]
#                           [--quant TYPE]
#
# --quant TYPE (Q8_0, Q4_K_M, Q6_K, ... anything llama-quantize takes) benchmarks a quantised
# GGUF instead: the BF16 GGUF requantised by llama-quantize, and both engines load that same
# file (dsd through its GGUF loader and integer kernels). --shape v2-4g is the 3.9 GB BF16
# checkpoint whose quantisations stay above 1 GB (Q8_0 2.1 GB, Q4_K_M ~1.2 GB); its bytes per
# token are counted from the GGUF's tensor table. llama-bench then runs with --repack 0: this
# llama.cpp (llama-cpp-python 0.3.36's) aborts on every deepseek2 Q8_0/Q4_K file we tried with
# its weight repacking on (GGML_ASSERT(*cur_backend_id != -1) in
# ggml_backend_sched_split_graph at context creation, tests/data/gguf_ref/tiny-Q8_0.gguf too);
# $DS_LLAMA_BENCH_ARGS replaces those extra llama-bench arguments.
#
# --bin times another bench_engine build (default build/bench/bench_engine), e.g. one made
# from a clean `git archive` of a commit while the working tree is mid-edit.
#
# --rounds N repeats the whole interleaved sequence N times and keeps each engine's best round
# per figure: on a shared machine a neighbour's burst then costs a round, not the comparison.
# Before each run the script waits (up to --idle-wait seconds, default 120) until the CPUs were
# at least 85% idle over the last second, since a neighbour's job on a 2-core machine halves a
# 2-thread run (llama.cpp's spinning OpenMP threads suffer most); the idle share and load
# average at each start are printed and kept with the results (load.txt).
#
# llama.cpp is for comparison only (tools/llama-cpp.sh build); without it the dsd figures are
# printed alone, or, with --skip-without-llama (bench/run.sh), nothing is run at all.
#
# Converter input: the converter accepts a BPE tokenizer only if it recognises it by hash, so
# the GGUF is made from a sibling directory holding links to the checkpoint's weights, the
# DeepSeek-Coder tokenizer rebuilt from llama.cpp's own vocab file (bench/llama_tokenizer.py;
# the checkpoint's vocab_size is that tokenizer's 32256), and a config.json that spells "no q
# LoRA" as q_lora_rank 0 instead of null: llama.cpp reads DeepSeek2 without q LoRA only when
# the key is present or the model has V2-Lite's 26/27 layers.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
THREADS="1 2"
BIN=build/bench/bench_engine
ROUNDS=1
IDLE_WAIT=120
REBUILD=0
SKIP=0
SHAPE=v2-1.3g
QUANT=
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --idle-wait) IDLE_WAIT=$2; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    --bin) BIN=$2; shift 2 ;;
    --skip-without-llama) SKIP=1; shift ;;
    --shape) SHAPE=$2; shift 2 ;;
    --quant) QUANT=$2; shift 2 ;;
    *) sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done
PROMPT=128 DECODE=64 REPS=3
WORK=build-bench
case "$SHAPE" in v2-1.3g|v2-4g) ;; *) echo "bench_vs_llama: --shape v2-1.3g or v2-4g" >&2; exit 2 ;; esac
CKPT=$WORK/$SHAPE
CONV=$WORK/$SHAPE-llama
GGUF=$WORK/$SHAPE-bf16.gguf

LB=$(tools/llama-cpp.sh bin llama-bench 2>/dev/null || true)
if [ -z "$LB" ] && [ $SKIP = 1 ]; then
  echo "bench_vs_llama: llama.cpp is not built (tools/llama-cpp.sh build); skipped"
  exit 0
fi
[ -x "$BIN" ] || { echo "bench_vs_llama: $BIN missing: cmake --build build --target bench_engine" >&2; exit 1; }

mkdir -p "$WORK"
if [ $REBUILD = 1 ] || [ ! -f "$CKPT/config.json" ] || [ ! -f "$CKPT/model.safetensors" ]; then
  rm -rf "$CKPT" "$GGUF"
  "$BIN" write "$CKPT" --shape "$SHAPE"
fi
if [ -n "$LB" ] && { [ ! -s "$GGUF" ] || [ "$CKPT/model.safetensors" -nt "$GGUF" ]; }; then
  rm -rf "$CONV" && mkdir -p "$CONV"
  ln -s "$ROOT/$CKPT/model.safetensors" "$CONV/model.safetensors"
  python3 -c 'import json, sys
c = json.load(open(sys.argv[1])); c["q_lora_rank"] = c["q_lora_rank"] or 0
json.dump(c, open(sys.argv[2], "w"), indent=1)' "$CKPT/config.json" "$CONV/config.json"
  PY=$(tools/llama-cpp.sh python | tail -1)
  "$PY" bench/llama_tokenizer.py "${DS_LLAMA_DIR:-$ROOT/build-llama}/src" "$CONV"
  echo "converting $CONV -> $GGUF (llama.cpp convert_hf_to_gguf.py, bf16)"
  tools/llama-cpp.sh convert "$CONV" "$GGUF.tmp" >"$WORK/convert.log" 2>&1 ||
    { tail -20 "$WORK/convert.log" >&2; exit 1; }
  mv "$GGUF.tmp" "$GGUF"
fi

DSD_MODEL=$CKPT
if [ -n "$QUANT" ]; then
  [ -n "$LB" ] || { echo "bench_vs_llama: --quant needs llama.cpp (tools/llama-cpp.sh build)" >&2; exit 1; }
  QGGUF=$WORK/$SHAPE-$QUANT.gguf
  if [ ! -s "$QGGUF" ] || [ "$GGUF" -nt "$QGGUF" ]; then
    echo "quantising $GGUF -> $QGGUF (llama-quantize $QUANT)"
    tools/llama-cpp.sh quantize "$GGUF" "$QGGUF.tmp" "$QUANT" >"$WORK/quantize-$QUANT.log" 2>&1 ||
      { tail -20 "$WORK/quantize-$QUANT.log" >&2; exit 1; }
    mv "$QGGUF.tmp" "$QGGUF"
  fi
  GGUF=$QGGUF DSD_MODEL=$QGGUF
fi
LARGS=${DS_LLAMA_BENCH_ARGS-${QUANT:+--repack 0}}

# Percent of CPU time idle over the next second (all CPUs, from /proc/stat).
idle_pct() {
  local a b
  a=($(head -1 /proc/stat)); sleep 1; b=($(head -1 /proc/stat))
  local tot=0 i
  for i in 1 2 3 4 5 6 7 8; do tot=$((tot + b[i] - a[i])); done
  echo $(( tot > 0 ? 100 * (b[4] - a[4] + b[5] - a[5]) / tot : 100 ))
}
# Waits until the machine is quiet (or IDLE_WAIT seconds passed), then logs how quiet it was.
quiet_start() {
  local what=$1 t0=$SECONDS idle
  while idle=$(idle_pct) && [ "$idle" -lt 85 ] && [ $((SECONDS - t0)) -lt "$IDLE_WAIT" ]; do :; done
  echo "$what idle=${idle}% load=$(cut -d' ' -f1-3 /proc/loadavg) waited=$((SECONDS - t0))s" |
    tee -a "$RES/load.txt"
}

RES=$WORK/results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RES"
{ echo "dsd: $BIN, built $(date -u -r "$BIN" +%FT%TZ); tree $(git describe --always --dirty)"
  git status --short model experts common | sed 's/^/  /'
  echo "llama.cpp: ${LB:-not built}${LARGS:+ ($LARGS)}${LB:+ (llama-cpp-python sdist $(ls "${DS_LLAMA_DIR:-$ROOT/build-llama}"/dl 2>/dev/null | head -1))}"
} >"$RES/version.txt"
echo "results in $RES (dsd: $DSD_MODEL${LB:+, llama.cpp: $GGUF})"
for r in $(seq 1 "$ROUNDS"); do
  for t in $THREADS; do
    quiet_start "round $r, threads $t: dsd"
    "$BIN" run --model "$DSD_MODEL" --threads "$t" --prompt $PROMPT --decode $DECODE \
      --repeat $REPS >"$RES/dsd_t${t}_r$r.txt"
    if [ -n "$LB" ]; then
      quiet_start "round $r, threads $t: llama.cpp"
      # shellcheck disable=SC2086 # LARGS is a word list
      "$LB" -m "$GGUF" -t "$t" -p $PROMPT -n $DECODE -r $REPS -o json $LARGS \
        >"$RES/llama_t${t}_r$r.json" 2>"$RES/llama_t${t}_r$r.err"
    fi
  done
done

python3 - "$RES" "$THREADS" "$PROMPT" "$DECODE" "$ROUNDS" <<'EOF'
import json, os, sys
res, threads, prompt, decode = sys.argv[1], sys.argv[2].split(), int(sys.argv[3]), int(sys.argv[4])
rounds = range(1, int(sys.argv[5]) + 1)
def kv(path):
    return {k: float(v) for k, v in (l.strip().split("=", 1) for l in open(path) if "=" in l
                                     and " " not in l.strip())}
def llama(path):
    if not os.path.exists(path):
        return None, None
    pp = tg = None
    for t in json.load(open(path)):
        if t["n_prompt"] == prompt and t["n_gen"] == 0:
            pp = t["avg_ts"]
        elif t["n_prompt"] == 0 and t["n_gen"] == decode:
            tg = t["avg_ts"]
    return pp, tg
def best(vals):
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None
f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"
r = lambda a, b: None if a is None or not b else a / b
rows = []
for t in threads:
    ds = [kv(f"{res}/dsd_t{t}_r{k}.txt") for k in rounds]
    d = {key: max(x[key] for x in ds) for key in ds[0]}  # best round per figure
    ll = [llama(f"{res}/llama_t{t}_r{k}.json") for k in rounds]
    pp, tg = best(x[0] for x in ll), best(x[1] for x in ll)
    bpt, rd = d["bytes_per_token"], d["read_gbs"]
    lg = None if tg is None else tg * bpt / 1e9
    rows.append([t, f(d["decode_tok_s"]), f(tg), f(r(d["decode_tok_s"], tg)),
                 f(d["prefill_tok_s"]), f(pp), f(r(d["prefill_tok_s"], pp)),
                 f(d["decode_gbs"]), f(lg), f(rd), f(r(d["decode_gbs"], rd)), f(r(lg, rd))])
    print(f"threads {t}: bytes/token {bpt / 1e6:.1f} MB; per round dsd decode/prefill "
          + ", ".join(f"{x['decode_tok_s']:.1f}/{x['prefill_tok_s']:.1f}" for x in ds)
          + "; llama.cpp " + ", ".join(f"{f(x[1], 1)}/{f(x[0], 1)}" for x in ll))
hdr = ["threads", "decode tok/s dsd", "llama.cpp", "ratio", f"prefill-{prompt} tok/s dsd",
       "llama.cpp", "ratio", "decode GB/s dsd", "llama.cpp", "read GB/s", "dsd / read",
       "llama.cpp / read"]
print("| " + " | ".join(hdr) + " |")
print("|" + "|".join(" --- " for _ in hdr) + "|")
for row in rows:
    print("| " + " | ".join(str(c) for c in row) + " |")
with open(f"{res}/table.md", "w") as fo:
    fo.write("| " + " | ".join(hdr) + " |\n|" + "|".join(" --- " for _ in hdr) + "|\n")
    for row in rows:
        fo.write("| " + " | ".join(str(c) for c in row) + " |\n")
EOF
if [ -z "$LB" ]; then
  echo "llama.cpp is not built: tools/llama-cpp.sh build (it vendors llama.cpp from the PyPI"
  echo "llama-cpp-python sdist; benchmarks only), then rerun for the side-by-side columns."
fi
