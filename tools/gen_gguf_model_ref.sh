#!/usr/bin/env bash
# tools/gen_gguf_model_ref.sh — GGUF models made by llama.cpp's own tools, and llama.cpp's greedy
# tokens and logits for them: the reference data of tests/test_gguf_model.c (tests/data/gguf_ref/).
# llama.cpp is used for reference data only (tools/llama-cpp.sh builds it from the PyPI
# llama-cpp-python sdist); the files are committed so the test needs none of it.
#
# What it makes (docs/gguf.md, "Models"):
#   tiny-F16.gguf                  models/tiny converted to F16 by convert_hf_to_gguf.py;
#   tiny-{Q8_0,Q4_K_M,Q6_K,Q2_K}.gguf  that file llama-quantize'd (hidden 256: the K-quant rows
#                                  of the hidden-wide matrices are whole)
#   v3w-F16.gguf                   the checkpoint of tools/gen_wide_checkpoint.py (V3, every
#                                  matrix row a multiple of 256 wide, 8 experts, groups, q LoRA)
#                                  converted to F16, with the byte-level tokenizer below;
#   v3w-{Q8_0,Q4_K_M,Q6_K,Q2_K}.gguf  that file llama-quantize'd
#   v3-{F16,Q8_0}.gguf             tests/data/ref/v3_bf16 (V3 sigmoid router with groups, q LoRA)
#                                  converted with --outtype f16 / q8_0, with a byte-level
#                                  tokenizer of its 256 ids (one merge) written for the converter;
#                                  v3-F16-kv_b.gguf the F16 one in the older attn_kv_b layout
#   v2-F32.gguf                    tests/data/ref/v2_greedy (V2 softmax router, no q LoRA), the
#                                  same way with --outtype f32; v2-F32-split-0000K-of-00003.gguf
#                                  the same as a split set (--split-max-tensors 12)
#   NAME_P.txt / NAME_P.f32        for prompt P: line 1 the prompt ids, line 2 llama.cpp's 32
#                                  greedy ids; float32 logits rows (vocab each) of the last prompt
#                                  position and of the next 31 fed tokens
#   tiny_text.txt                  llama.cpp's ids for the texts of test_tokenizer_tiny
#   tests/corpus/gguf/deepseek2_meta.gguf   a fuzz seed: v3-F16.gguf's metadata, no tensors
# The converter identifies a tokenizer's pre-tokenizer by a hash of its output and knows neither
# tokenizer; both are GPT-2's ByteLevel pre-tokenizer exactly, so tools/llama_convert.py runs
# the unmodified converter with their hashes mapped to "gpt-2".
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/tests/data/gguf_ref}
LL=$ROOT/tools/llama-cpp.sh
SRC=${DS_LLAMA_DIR:-$ROOT/build-llama}/src
BLD=${DS_LLAMA_DIR:-$ROOT/build-llama}/build
N=32

"$LL" bin llama-quantize >/dev/null 2>&1 || "$LL" build
PY=$("$LL" python | tail -1)
QUANT=$("$LL" bin llama-quantize)
GREEDY=$BLD/bin/llama-greedy
g++ -O2 -std=c++17 -fopenmp -I "$SRC/include" -I "$SRC/ggml/include" "$ROOT/tools/llama_greedy.cpp" \
  "$BLD/src/libllama.a" "$BLD/ggml/src/libggml.a" "$BLD/ggml/src/libggml-cpu.a" \
  "$BLD/ggml/src/libggml-base.a" -lpthread -ldl -o "$GREEDY"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"

# the pre-tokenizer hash the converter computes for the tokenizer in DIR
chkhsh() {
  "$PY" - "$SRC" "$1" <<'PY'
import inspect, re, sys
from hashlib import sha256
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + "/gguf-py")
from conversion import base
from transformers import AutoTokenizer
m = re.search(r"chktxt = '((?:[^'\\]|\\.)*)'", inspect.getsource(base.TextModel.get_vocab_base_pre))
chktxt = eval("'" + m.group(1) + "'")
tok = AutoTokenizer.from_pretrained(sys.argv[2])
print(sha256(str(tok.encode(chktxt)).encode()).hexdigest())
PY
}

convert() { # HF_DIR OUT.gguf OUTTYPE [CONVERTER-ARGS...]
  local h
  h=$(chkhsh "$1")
  "$PY" "$ROOT/tools/llama_convert.py" "$SRC" "$h=gpt-2" "$1" --outfile "$2" --outtype "$3" "${@:4}" \
    >"$TMP/convert.log" 2>&1 || { tail -20 "$TMP/convert.log" >&2; exit 1; }
}

# models/tiny: F16, then llama-quantize (the types people download)
quantize() { # NAME: $OUT/NAME-F16.gguf -> $OUT/NAME-<TYPE>.gguf for each type
  for t in Q8_0 Q4_K_M Q6_K Q2_K; do
    "$QUANT" "$OUT/$1-F16.gguf" "$OUT/$1-$t.gguf" "$t" >"$TMP/quant.log" 2>&1 ||
      { tail -20 "$TMP/quant.log" >&2; exit 1; }
  done
}
convert "$ROOT/models/tiny" "$OUT/tiny-F16.gguf" f16
quantize tiny

# a byte-level tokenizer of the 256 ids of a test checkpoint (they have none), for the converter
byte_tokenizer() { # DIR
  "$PY" - "$1" <<'PY'
import json, sys
bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
cs, n = bs[:], 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + n); n += 1
u = dict(zip(bs, map(chr, cs)))
# llama.cpp refuses a gpt2 vocabulary without merges: id 255 becomes "  " (one merge) instead
# of the byte 0xFF (the ids are all the tests use)
vocab = {u[b]: b for b in range(255)}
vocab["\u0120\u0120"] = 255
tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
      "normalizer": None,
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                        "use_regex": True},
      "post_processor": None,
      "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                  "use_regex": True},
      "model": {"type": "BPE", "dropout": None, "unk_token": None,
                "continuing_subword_prefix": None, "end_of_word_suffix": None,
                "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                "vocab": vocab, "merges": ["\u0120 \u0120"]}}
json.dump(tj, open(sys.argv[1] + "/tokenizer.json", "w"))
json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False},
          open(sys.argv[1] + "/tokenizer_config.json", "w"))
PY
}

# tests/data/ref/v3_bf16 (V3: sigmoid router with groups, q LoRA, BF16)
V3=$TMP/v3_bf16
cp -r "$ROOT/tests/data/ref/v3_bf16" "$V3"
byte_tokenizer "$V3"
rm -f "$V3"/ref_*
convert "$V3" "$OUT/v3-F16.gguf" f16
convert "$V3" "$OUT/v3-Q8_0.gguf" q8_0
# the same F16 file in the older layout (attn_kv_b, no _mla keys), rewritten with gguf-py
"$PY" "$ROOT/tools/gguf_legacy_kv_b.py" "$OUT/v3-F16.gguf" "$OUT/v3-F16-kv_b.gguf"

# a fuzz seed: the metadata (config + tokenizer) of v3-F16.gguf without its tensors
"$PY" - "$OUT/v3-F16.gguf" "$ROOT/tests/corpus/gguf/deepseek2_meta.gguf" <<'PY'
import sys
import gguf
r = gguf.GGUFReader(sys.argv[1])
w = gguf.GGUFWriter(sys.argv[2], r.fields["general.architecture"].contents())
for k, f in r.fields.items():
    if k.startswith("GGUF.") or k == "general.architecture":
        continue
    t = gguf.GGUFValueType(f.types[0])
    sub = gguf.GGUFValueType(f.types[1]) if t == gguf.GGUFValueType.ARRAY else None
    w.add_key_value(k, f.contents(), t, sub_type=sub)
w.write_header_to_file(); w.write_kv_data_to_file(); w.close()
PY

# v3w: DeepSeek-V3 of hidden 256 whose every matrix row is whole K-quant super-blocks, made by
# tools/gen_wide_checkpoint.py (seeded; float32 safetensors), F16, then llama-quantize
"$PY" "$ROOT/tools/gen_wide_checkpoint.py" "$TMP" >"$TMP/wide.log" 2>&1 ||
  { tail -20 "$TMP/wide.log" >&2; exit 1; }
byte_tokenizer "$TMP/v3w"
rm -f "$TMP"/v3w/ref_*
convert "$TMP/v3w" "$OUT/v3w-F16.gguf" f16
quantize v3w

# tests/data/ref/v2_greedy (V2: softmax router, no q LoRA, F32). llama.cpp reads a deepseek2
# file without q LoRA only when attention.q_lora_rank is present (or the model has V2-Lite's
# layer count); the converter writes it for a non-null value, so the copy says 0 (= none).
V2=$TMP/v2_greedy
cp -r "$ROOT/tests/data/ref/v2_greedy" "$V2"
rm -f "$V2"/ref_*
"$PY" -c 'import json,sys; p=sys.argv[1]; c=json.load(open(p)); c["q_lora_rank"]=0; json.dump(c,open(p,"w"),indent=1)' "$V2/config.json"
byte_tokenizer "$V2"
convert "$V2" "$OUT/v2-F32.gguf" f32
# the same as a split set of 3 files (v2-F32-split-0000K-of-00003.gguf)
convert "$V2" "$OUT/v2-F32-split.gguf" f32 --split-max-tensors 12

ref() { # NAME PROMPT_INDEX IDS
  local f=$OUT/$1.gguf r=$OUT/$1_$2
  local toks
  toks=$("$GREEDY" "$f" --tokens "$3" -n $N --logits-out "$r.f32" | sed -n 's/^tokens: //p')
  printf '%s\n%s\n' "$3" "$toks" >"$r.txt"
}
for t in F16 Q8_0 Q4_K_M Q6_K Q2_K; do
  ref "tiny-$t" 0 "0,300,400,500"
  ref "tiny-$t" 1 "0,319,1112,280,290,684,301"  # BOS + "The meaning of life is"
done
for t in F16 Q8_0 Q4_K_M Q6_K Q2_K; do
  ref "v3w-$t" 0 "3,17,42"
  ref "v3w-$t" 1 "5,100,7,9,200,11,1"  # the prompts of tools/gen_reference.py
done
for f in v3-F16 v3-Q8_0 v2-F32; do
  ref "$f" 0 "3,17,42"
  ref "$f" 1 "5,9,200,7,64"
done
# llama.cpp's tokenisation of the texts of test_tokenizer_tiny (BOS added, specials parsed)
texts=(
  "The meaning of life is"
  "Hello, world! It's 2024: 12345 apples and 3.14 pies."
  $'  leading spaces\tand tabs\n\nnew lines  '
  "<｜begin▁of▁sentence｜>special<｜end▁of▁sentence｜> tokens"
  "naïve café — déjà vu, 東京 and Ελληνικά"
  "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it"
  ""
)
: >"$OUT/tiny_text.txt"
for t in "${texts[@]}"; do
  "$GREEDY" "$OUT/tiny-Q8_0.gguf" --text "$t" | sed -n 's/^tokens: //p' >>"$OUT/tiny_text.txt"
done
ls -la "$OUT"
