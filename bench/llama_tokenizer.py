#!/usr/bin/env python3
"""llama_tokenizer.py — a Hugging Face tokenizer that llama.cpp's converter recognises, for
converting bench_engine's synthetic checkpoint to GGUF (bench/bench_vs_llama.sh).

convert_hf_to_gguf.py identifies a BPE tokenizer by the SHA-256 of the ids it gives for a fixed
test string and refuses any tokenizer it does not know (models/tiny's own tokenizer included).
llama.cpp ships the vocabularies of the tokenizers it knows as test files
(models/ggml-vocab-*.gguf); this rebuilds DeepSeek-Coder's tokenizer.json from that file — its
tokens and merges, DeepSeek-Coder's pre-tokenizer split rules (the same regexes as llama.cpp's
LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_CODER), BOS prepended — and checks that it hashes to the value
the converter maps to "deepseek-coder". The converter then runs unmodified. Benchmarks feed
token ids, never text, so only the vocabulary size (32256) matters to the timings.

usage: llama_tokenizer.py LLAMA_SRC OUT_DIR     (run with the converter's venv python)
"""
import json
import os
import sys
from hashlib import sha256

import gguf  # llama.cpp's gguf-py, installed in the converter's venv

# convert_hf_to_gguf's get_vocab_base_pre: the hash of deepseek-ai/deepseek-coder-6.7b-base.
CODER_HASH = "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821"


def split(rx):
    return {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False}


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: llama_tokenizer.py LLAMA_SRC OUT_DIR")
    src, out = sys.argv[1], sys.argv[2]
    r = gguf.GGUFReader(os.path.join(src, "models", "ggml-vocab-deepseek-coder.gguf"))
    f = r.fields
    toks = f["tokenizer.ggml.tokens"].contents()
    merges = f["tokenizer.ggml.merges"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    bos = f["tokenizer.ggml.bos_token_id"].contents()
    eos = f["tokenizer.ggml.eos_token_id"].contents()
    control, user = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": types[i] != control, "special": types[i] == control}
             for i, t in enumerate(toks) if types[i] in (control, user)]
    b = toks[bos]
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split("[\r\n]"), split("\\s?\\p{L}+"), split("\\s?\\p{P}+"),
            split("[一-龥ࠀ-一가-퟿]+"),
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b: {"id": b, "ids": [bos], "tokens": [b]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(toks)},
                  "merges": [m.split(" ") for m in merges]},
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as fo:
        json.dump(tj, fo, ensure_ascii=False)
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as fo:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
                   "add_eos_token": False, "bos_token": b, "eos_token": toks[eos],
                   "clean_up_tokenization_spaces": False, "model_max_length": 16384},
                  fo, ensure_ascii=False)

    # The converter's own check, so a mismatch fails here with a clear message.
    from transformers import AutoTokenizer
    chktxt = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple '
              'emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 '
              '3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на '
              'Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
    ids = AutoTokenizer.from_pretrained(out).encode(chktxt)
    h = sha256(str(ids).encode()).hexdigest()
    if h != CODER_HASH:
        sys.exit(f"llama_tokenizer.py: tokenizer hash {h} is not deepseek-coder's {CODER_HASH}")
    print(f"{out}: DeepSeek-Coder tokenizer, {len(toks)} ids (converter hash matches)")


if __name__ == "__main__":
    main()
