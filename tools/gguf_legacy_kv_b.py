#!/usr/bin/env python3
"""gguf_legacy_kv_b.py — rewrites a deepseek2 GGUF from the MLA-absorbed layout (split, k_b
transposed per head: attn_k_b {dn, C, H} + attn_v_b {C, dv, H}, key_length = C + rope and the real
head dims in key/value_length_mla) into the older one (HF's kv_b_proj as attn_kv_b
{C, H*(dn+dv)}, key_length = dn + rope, value_length = dv, no _mla keys), which older converters
wrote. Reference data for tests/test_gguf_model.c (the loader reads both; the two files must give
the same logits). Run with the converter's venv python (gguf-py, numpy).

usage: gguf_legacy_kv_b.py IN.gguf OUT.gguf
"""
import sys

import gguf
import numpy as np

if len(sys.argv) != 3:
    sys.exit("usage: gguf_legacy_kv_b.py IN.gguf OUT.gguf")
src, dst = sys.argv[1], sys.argv[2]
r = gguf.GGUFReader(src)
arch = r.fields["general.architecture"].contents()
w = gguf.GGUFWriter(dst, arch)
skip = {"general.architecture", "deepseek2.attention.key_length_mla",
        "deepseek2.attention.value_length_mla", "deepseek2.attention.key_length",
        "deepseek2.attention.value_length"}
F = r.fields
dr = F["deepseek2.rope.dimension_count"].contents()
qk, dv = F["deepseek2.attention.key_length_mla"].contents(), F["deepseek2.attention.value_length_mla"].contents()
for k, f in F.items():
    if k.startswith("GGUF.") or k in skip:
        continue
    t = gguf.GGUFValueType(f.types[0])
    if t == gguf.GGUFValueType.ARRAY:
        w.add_key_value(k, f.contents(), t, sub_type=gguf.GGUFValueType(f.types[1]))
    else:
        w.add_key_value(k, f.contents(), t)
w.add_key_value("deepseek2.attention.key_length", qk, gguf.GGUFValueType.UINT32)
w.add_key_value("deepseek2.attention.value_length", dv, gguf.GGUFValueType.UINT32)
T = {t.name: t for t in r.tensors}
for t in r.tensors:
    if t.name.endswith("attn_v_b.weight"):
        continue
    if t.name.endswith("attn_k_b.weight"):
        kb = np.array(T[t.name].data)                      # [H, C, dn] (numpy order)
        vb = np.array(T[t.name.replace("k_b", "v_b")].data)  # [H, dv, C]
        kv = np.concatenate([kb.transpose(0, 2, 1), vb], axis=1)  # [H, dn+dv, C]
        kv = kv.reshape(-1, kv.shape[-1])
        w.add_tensor(t.name.replace("attn_k_b", "attn_kv_b"), kv, raw_dtype=t.tensor_type)
        continue
    w.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed([int(x) for x in t.shape])),
                 raw_dtype=t.tensor_type)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
