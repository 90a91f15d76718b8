#!/usr/bin/env python3
"""Per-unit byte counts of a model file, computed independently of dsd's C code, for
tests/test_model_bytes.c to compare `ds_model_unit_bytes` (model/model_bytes.c) with.

A GGUF is read with llama.cpp's own `gguf` package (GGUFReader: each tensor's type, shape and
n_bytes as gguf-py computes them); an HF checkpoint directory from its safetensors JSON headers
(read here with the standard library). Tensors are classified into units by their names with
regular expressions, and the documented holding rules (docs/placement.md, "Real bytes") are
applied:

  matrix        its bytes in the file (FP8: + its weight_scale_inv)
  vector        4 bytes per value (the loader's float32 copy)
  k_b + v_b     one kv_b of H*(dn+dv) x C: 2 bytes a value when both are F16/BF16, 4 otherwise
  stacked exps  n_bytes / n_expert per expert
  --quantize    a linear weight of F32/F16/BF16/F8 (not token_embd/embed_tokens, not the router
                gate, not a vector) becomes Q8_0 (34 bytes per 32 values) or Q4_K (144 per 256,
                Q8_0 when the row length is not a multiple of 256; unchanged when not a
                multiple of 32); FP8 scales are dropped; a kv_b rebuilt from block types stays
                float32

Output: one line per figure, `embed N`, `head N`, `attn L N`, `router L N`, `dense L N`,
`shared L N`, `expert L N` (the largest expert of layer L), sorted as written.

    build-gguf-venv/bin/python tools/gen_unit_bytes.py FILE.gguf|DIR [--quantize q8_0|q4_k] > OUT
"""
import argparse
import json
import os
import re
import struct
import sys
from collections import defaultdict


def quantized(q, kind, rows, cols, nbytes):
    """Bytes of a [rows, cols] weight of element kind ('F32', 'F16', 'BF16', 'F8' or a block
    type) under --quantize q."""
    if q is None or kind not in ("F32", "F16", "BF16", "F8"):
        return nbytes
    if q == "q4_k" and cols % 256 == 0:
        return rows * cols // 256 * 144
    if cols % 32 == 0:
        return rows * cols // 32 * 34
    return nbytes


def gguf_units(path, q):
    from gguf import GGUFReader  # PyPI gguf, llama.cpp's reader

    # a split set: every part's tensors
    m = re.match(r"(.*)-(\d{5})-of-(\d{5})\.gguf$", path)
    paths = [path]
    if m:
        paths = ["%s-%05d-of-%s.gguf" % (m.group(1), k, m.group(3))
                 for k in range(1, int(m.group(3)) + 1)]
    readers = [GGUFReader(p) for p in paths]
    first = readers[0]
    f = first.fields
    def kv(key):
        fl = f[key]
        return fl.parts[fl.data[0]][0]
    heads = int(kv("deepseek2.attention.head_count"))
    kv_lora = int(kv("deepseek2.attention.kv_lora_rank"))
    tensors = {t.name: t for r in readers for t in r.tensors}
    out = defaultdict(int)
    seen = set()
    for name, t in tensors.items():
        kind = t.tensor_type.name
        shape = [int(x) for x in t.shape]  # ggml order
        nb = int(t.n_bytes)
        if name == "token_embd.weight":
            out[("embed",)] += nb
            if "output.weight" not in tensors:  # tied head
                out[("head",)] += nb
            continue
        if name == "output_norm.weight":
            out[("head",)] += 4 * shape[0]
            continue
        if name == "output.weight":
            out[("head",)] += quantized(q, kind, shape[1], shape[0], nb)
            continue
        mm = re.match(r"blk\.(\d+)\.(.+)\.(weight|bias)$", name)
        if not mm:
            raise SystemExit("unknown tensor " + name)
        l, what = int(mm.group(1)), mm.group(2)
        if len(shape) == 1:  # norms, router bias
            unit = "router" if what == "exp_probs_b" else "attn"
            out[(unit, l)] += 4 * shape[0]
        elif what in ("attn_k_b", "attn_v_b"):
            if l in seen:
                continue
            seen.add(l)
            kb, vb = tensors["blk.%d.attn_k_b.weight" % l], tensors["blk.%d.attn_v_b.weight" % l]
            dn, dv = int(kb.shape[0]), int(vb.shape[1])
            rows = heads * (dn + dv)
            plain = kb.tensor_type == vb.tensor_type and kb.tensor_type.name in ("F32", "F16", "BF16")
            es = 2 if plain and kb.tensor_type.name != "F32" else 4
            out[("attn", l)] += quantized(q, kb.tensor_type.name, rows, kv_lora, rows * kv_lora * es) \
                if plain else rows * kv_lora * 4
        elif what.endswith("_exps"):
            cols, rows, n_exp = shape
            out[("expert", l)] += quantized(q, kind, rows, cols, nb // n_exp)
        elif what == "ffn_gate_inp":
            out[("router", l)] += nb
        elif what.endswith("_shexp"):
            out[("shared", l)] += quantized(q, kind, shape[1], shape[0], nb)
        elif what in ("ffn_gate", "ffn_up", "ffn_down"):
            out[("dense", l)] += quantized(q, kind, shape[1], shape[0], nb)
        else:  # attention matrices
            out[("attn", l)] += quantized(q, kind, shape[1], shape[0], nb)
    return out


ST_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I64": 8, "I32": 4, "U8": 1}


def hf_units(path, q):
    cfg = json.load(open(os.path.join(path, "config.json")))
    files = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
    tensors = {}
    for fn in files:
        with open(os.path.join(path, fn), "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            hdr = json.loads(fh.read(n))
        for k, v in hdr.items():
            if k != "__metadata__":
                tensors[k] = v
    def nbytes(v):
        n = ST_SIZE[v["dtype"]]
        for s in v["shape"]:
            n *= s
        return n
    out = defaultdict(int)
    experts = defaultdict(int)
    tied = "lm_head.weight" not in tensors
    for name, v in tensors.items():
        if name.endswith("_scale_inv"):
            continue  # counted with its weight
        shape, kind = v["shape"], v["dtype"]
        kind = "F8" if kind == "F8_E4M3" else kind
        nb = nbytes(v)
        if kind == "F8":
            nb += nbytes(tensors[name + "_scale_inv"])
        if name == "model.embed_tokens.weight":
            out[("embed",)] += nb
            if tied:
                out[("head",)] += nb
            continue
        if name == "model.norm.weight":
            out[("head",)] += 4 * shape[0]
            continue
        if name == "lm_head.weight":
            out[("head",)] += quantized(q, kind, shape[0], shape[1], nb)
            continue
        mm = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        if not mm:
            raise SystemExit("unknown tensor " + name)
        l, rest = int(mm.group(1)), mm.group(2)
        if int(l) >= cfg["num_hidden_layers"]:
            continue  # MTP layers are not loaded
        if len(shape) == 1:
            unit = "router" if rest.startswith("mlp.gate.") else "attn"
            out[(unit, l)] += 4 * shape[0]
            continue
        held = quantized(q, kind, shape[0], shape[1], nb)
        me = re.match(r"mlp\.experts\.(\d+)\.", rest)
        if me:
            experts[(l, int(me.group(1)))] += held
        elif rest == "mlp.gate.weight":
            out[("router", l)] += nb
        elif rest.startswith("mlp.shared_experts."):
            out[("shared", l)] += held
        elif rest.startswith("mlp."):
            out[("dense", l)] += held
        else:
            out[("attn", l)] += held
    for (l, e), b in experts.items():
        out[("expert", l)] = max(out[("expert", l)], b)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--quantize", choices=["q8_0", "q4_k"])
    a = ap.parse_args()
    u = hf_units(a.model, a.quantize) if os.path.isdir(a.model) else gguf_units(a.model, a.quantize)
    for k in sorted(u, key=lambda k: (len(k), k)):
        sys.stdout.write(" ".join(str(x) for x in k) + " %d\n" % u[k])


if __name__ == "__main__":
    main()
