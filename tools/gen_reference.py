#!/usr/bin/env python3
"""Makes the engine's reference data: tiny random DeepSeek-V2/V3 checkpoints in the hub layout
and HF transformers' logits for fixed token sequences (prefill + greedy decode).

Usage: tools/gen_reference.py [OUTDIR]   (default tests/data/ref)

Each checkpoint OUTDIR/<name>/ holds config.json, model.safetensors (or shards + index), and per
prompt i: ref_<i>.txt (line 1 prompt ids, line 2 generated ids) and ref_<i>.f32 (float32 LE
logits, one row of vocab_size per fed position: the prompt, then every generated token but the
last). The reference is HF's DeepseekV3ForCausalLM / DeepseekV2ForCausalLM in float32 on CPU; for
BF16/FP8 variants the model holds the rounded/dequantised weights, so the reference is the
dequantised model. Experts are written unfused (model.layers.N.mlp.experts.E.gate_proj.weight),
the way hub checkpoints are, and every F32/BF16 checkpoint is reloaded through from_pretrained to
check that HF reads our files back to the same logits."""
import json
import math
import os
import sys
import zlib

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM)

PROMPTS = [[3, 17, 42], [5, 100, 7, 9, 200, 11, 1]]
STEPS = 17

SPECS = [
    # V3, q LoRA, 4 groups pick 2, yarn with mscale != mscale_all_dim, 2 shards.
    dict(name="v3_qlora_group_yarn", arch=3, hidden_size=64, q_lora_rank=24, kv_lora_rank=32,
         num_attention_heads=4, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
         num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=96,
         moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
         num_experts_per_tok=2, n_group=4, topk_group=2, norm_topk_prob=True,
         routed_scaling_factor=2.5,
         rope=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8,
                   beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.8),
         shards=2),
    # V3 without q LoRA, ungrouped, no renormalisation, width 72.
    dict(name="v3_noqlora_d72", arch=3, hidden_size=72, q_lora_rank=None, kv_lora_rank=24,
         num_attention_heads=3, qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=10,
         num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=80,
         moe_intermediate_size=20, n_routed_experts=6, n_shared_experts=2,
         num_experts_per_tok=3, n_group=1, topk_group=1, norm_topk_prob=False,
         routed_scaling_factor=1.5, rope=None),
    # V2 softmax greedy (V2-Lite-like: no q LoRA).
    dict(name="v2_greedy", arch=2, hidden_size=48, q_lora_rank=None, kv_lora_rank=16,
         num_attention_heads=2, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
         num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=64,
         moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
         num_experts_per_tok=2, topk_method="greedy", routed_scaling_factor=1.0, rope=None),
    # V2 softmax group_limited_greedy with q LoRA.
    dict(name="v2_group_limited", arch=2, hidden_size=40, q_lora_rank=16, kv_lora_rank=16,
         num_attention_heads=2, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
         num_hidden_layers=2, first_k_dense_replace=0, intermediate_size=64,
         moe_intermediate_size=12, n_routed_experts=8, n_shared_experts=1,
         num_experts_per_tok=3, n_group=4, topk_group=2, topk_method="group_limited_greedy",
         routed_scaling_factor=16.0, rope=None),
    # V3 BF16 weights.
    dict(name="v3_bf16", arch=3, hidden_size=64, q_lora_rank=32, kv_lora_rank=32,
         num_attention_heads=2, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
         num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=64,
         moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
         num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=True,
         routed_scaling_factor=2.5, rope=None, dtype="bf16"),
    # V3 FP8 (128x128 blocks, width 160 so blocks are partial at the edges).
    dict(name="v3_fp8", arch=3, hidden_size=160, q_lora_rank=136, kv_lora_rank=144,
         num_attention_heads=2, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
         num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=200,
         moe_intermediate_size=136, n_routed_experts=4, n_shared_experts=1,
         num_experts_per_tok=2, n_group=2, topk_group=2, norm_topk_prob=True,
         routed_scaling_factor=2.5,
         rope=dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=4,
                   beta_fast=32, beta_slow=1, mscale=0.9, mscale_all_dim=0.7),
         dtype="fp8"),
]

VOCAB = 256


def make_config(s):
    common = dict(vocab_size=VOCAB, hidden_size=s["hidden_size"],
                  intermediate_size=s["intermediate_size"],
                  moe_intermediate_size=s["moe_intermediate_size"],
                  num_hidden_layers=s["num_hidden_layers"],
                  num_attention_heads=s["num_attention_heads"],
                  num_key_value_heads=s["num_attention_heads"],
                  q_lora_rank=s["q_lora_rank"], kv_lora_rank=s["kv_lora_rank"],
                  qk_nope_head_dim=s["qk_nope_head_dim"], qk_rope_head_dim=s["qk_rope_head_dim"],
                  v_head_dim=s["v_head_dim"], n_routed_experts=s["n_routed_experts"],
                  n_shared_experts=s["n_shared_experts"],
                  num_experts_per_tok=s["num_experts_per_tok"],
                  first_k_dense_replace=s["first_k_dense_replace"],
                  routed_scaling_factor=s["routed_scaling_factor"], max_position_embeddings=64,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                  head_dim=s["qk_rope_head_dim"])
    rope = dict(rope_theta=10000.0, rope_type="default")
    if s["rope"]:
        rope = dict(rope_theta=10000.0, **s["rope"])
    if s["arch"] == 3:
        c = DeepseekV3Config(**common, n_group=s["n_group"], topk_group=s["topk_group"],
                             norm_topk_prob=s["norm_topk_prob"], rope_parameters=rope)
    else:
        c = DeepseekV2Config(**common, n_group=s.get("n_group"), topk_group=s.get("topk_group"),
                             topk_method=s["topk_method"], rope_parameters=rope)
    return c


def hub_config(s, c):
    """config.json as the hub checkpoints spell it (rope_scaling, torch_dtype, scoring_func)."""
    d = dict(architectures=["DeepseekV3ForCausalLM" if s["arch"] == 3 else "DeepseekV2ForCausalLM"],
             model_type="deepseek_v3" if s["arch"] == 3 else "deepseek_v2",
             vocab_size=VOCAB, hidden_size=s["hidden_size"],
             intermediate_size=s["intermediate_size"],
             moe_intermediate_size=s["moe_intermediate_size"],
             num_hidden_layers=s["num_hidden_layers"],
             num_attention_heads=s["num_attention_heads"],
             num_key_value_heads=s["num_attention_heads"], q_lora_rank=s["q_lora_rank"],
             kv_lora_rank=s["kv_lora_rank"], qk_nope_head_dim=s["qk_nope_head_dim"],
             qk_rope_head_dim=s["qk_rope_head_dim"], v_head_dim=s["v_head_dim"],
             n_routed_experts=s["n_routed_experts"], n_shared_experts=s["n_shared_experts"],
             num_experts_per_tok=s["num_experts_per_tok"],
             first_k_dense_replace=s["first_k_dense_replace"], moe_layer_freq=1,
             routed_scaling_factor=s["routed_scaling_factor"], max_position_embeddings=64,
             rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
             rope_theta=10000.0, hidden_act="silu", attention_bias=False,
             num_nextn_predict_layers=0)
    if s["arch"] == 3:
        d.update(n_group=s["n_group"], topk_group=s["topk_group"], topk_method="noaux_tc",
                 scoring_func="sigmoid", norm_topk_prob=s["norm_topk_prob"])
    else:
        d.update(n_group=s.get("n_group") or 1, topk_group=s.get("topk_group") or 1,
                 topk_method=s["topk_method"], scoring_func="softmax", norm_topk_prob=False)
    if s["rope"]:
        r = dict(s["rope"])
        r["type"] = r.pop("rope_type")
        d["rope_scaling"] = r
    else:
        d["rope_scaling"] = None
    dt = s.get("dtype", "f32")
    d["torch_dtype"] = {"f32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}[dt]
    if dt == "fp8":
        d["quantization_config"] = dict(activation_scheme="dynamic", fmt="e4m3",
                                        quant_method="fp8", weight_block_size=[128, 128])
    return d


def randomize(model, s, gen):
    """Weights large enough that logits and router scores are well separated."""
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            if k.endswith("layernorm.weight") or k.endswith("norm.weight"):
                v.copy_(1.0 + 0.2 * torch.randn(v.shape, generator=gen))
            elif k.endswith("e_score_correction_bias"):
                # Positive: HF and DeepSeek then agree whatever their group mask value.
                v.copy_(0.05 + 0.1 * torch.rand(v.shape, generator=gen))
            elif k.endswith("embed_tokens.weight"):
                v.copy_(torch.randn(v.shape, generator=gen))
            elif "experts.gate_up_proj" in k or "experts.down_proj" in k and v.dim() == 3:
                fan_in = v.shape[-1]
                v.copy_(torch.randn(v.shape, generator=gen) * (1.5 / math.sqrt(fan_in)))
            else:
                fan_in = v.shape[-1]
                v.copy_(torch.randn(v.shape, generator=gen) * (1.5 / math.sqrt(fan_in)))


def hub_state(model):
    """State dict in the hub layout: experts unfused, per expert gate/up/down."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone().contiguous()
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                out[f"{pre}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{pre}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v
    return out


def fuse_back(model, hub):
    """Loads a hub-layout dict (possibly rounded) into the fused in-memory model."""
    sd = model.state_dict()
    new = {}
    for k in sd:
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            n = sd[k].shape[0]
            new[k] = torch.stack([torch.cat([hub[f"{pre}{e}.gate_proj.weight"],
                                             hub[f"{pre}{e}.up_proj.weight"]]) for e in range(n)])
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            n = sd[k].shape[0]
            new[k] = torch.stack([hub[f"{pre}{e}.down_proj.weight"] for e in range(n)])
        else:
            new[k] = hub[k]
    model.load_state_dict(new)


def is_quantized_linear(k):
    if not k.endswith(".weight") or "layers." not in k:
        return False
    if "layernorm" in k or k.endswith("mlp.gate.weight"):
        return False
    return True


def quant_fp8(w, blk=128):
    rows, cols = w.shape
    br, bc = math.ceil(rows / blk), math.ceil(cols / blk)
    scale = torch.zeros(br, bc, dtype=torch.float32)
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    deq = torch.zeros_like(w)
    for i in range(br):
        for j in range(bc):
            blkw = w[i * blk:(i + 1) * blk, j * blk:(j + 1) * blk]
            s = blkw.abs().max().item() / 448.0
            s = s if s > 0 else 1.0
            qq = (blkw / s).to(torch.float8_e4m3fn)
            q[i * blk:(i + 1) * blk, j * blk:(j + 1) * blk] = qq
            deq[i * blk:(i + 1) * blk, j * blk:(j + 1) * blk] = qq.to(torch.float32) * s
            scale[i, j] = s
    return q, scale, deq


def save_shards(hub_saved, outdir, shards):
    names = sorted(hub_saved)
    if shards <= 1:
        save_file(hub_saved, os.path.join(outdir, "model.safetensors"), metadata={"format": "pt"})
        return
    per = math.ceil(len(names) / shards)
    wmap, total = {}, 0
    for i in range(shards):
        fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: hub_saved[n] for n in names[i * per:(i + 1) * per]}
        for n, t in part.items():
            wmap[n] = fn
            total += t.numel() * t.element_size()
        save_file(part, os.path.join(outdir, fn), metadata={"format": "pt"})
    with open(os.path.join(outdir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f, indent=1)


def run_ref(model, prompt):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(STEPS):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
        fed = seq[:-1]
        logits = model(torch.tensor([fed])).logits[0].float().numpy()
    return seq[len(prompt):], logits


def build(s, outroot):
    torch.manual_seed(1234)
    gen = torch.Generator().manual_seed(zlib.crc32(s["name"].encode()))
    c = make_config(s)
    cls = DeepseekV3ForCausalLM if s["arch"] == 3 else DeepseekV2ForCausalLM
    model = cls(c).float().eval()
    randomize(model, s, gen)
    hub = hub_state(model)
    dt = s.get("dtype", "f32")
    saved = {}
    for k, v in hub.items():
        if dt == "f32":
            saved[k] = v
        elif k.endswith("e_score_correction_bias"):
            saved[k] = v.float()
        elif dt == "fp8" and is_quantized_linear(k):
            q, scale, deq = quant_fp8(v)
            saved[k] = q
            saved[k + "_scale_inv"] = scale
            hub[k] = deq
        else:
            saved[k] = v.to(torch.bfloat16)
            hub[k] = saved[k].float()
    fuse_back(model, hub)
    outdir = os.path.join(outroot, s["name"])
    os.makedirs(outdir, exist_ok=True)
    for f in os.listdir(outdir):
        os.unlink(os.path.join(outdir, f))
    with open(os.path.join(outdir, "config.json"), "w") as f:
        json.dump(hub_config(s, c), f, indent=1)
    save_shards(saved, outdir, s.get("shards", 1))
    for i, p in enumerate(PROMPTS):
        gen_ids, logits = run_ref(model, p)
        with open(os.path.join(outdir, f"ref_{i}.txt"), "w") as f:
            f.write(",".join(map(str, p)) + "\n" + ",".join(map(str, gen_ids)) + "\n")
        logits.astype("<f4").tofile(os.path.join(outdir, f"ref_{i}.f32"))
    if dt != "fp8":
        # HF must read our hub-layout files back to the same logits.
        m2 = cls.from_pretrained(outdir, dtype=torch.float32).eval()
        with torch.no_grad():
            a = model(torch.tensor([PROMPTS[1]])).logits
            b = m2(torch.tensor([PROMPTS[1]])).logits
        d = (a - b).abs().max().item()
        assert d < 1e-5, f"{s['name']}: HF reload differs by {d}"
    print(f"{s['name']}: ok, tokens {gen_ids}")


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "ref")
    torch.set_num_threads(1)
    for s in SPECS:
        build(s, out)


if __name__ == "__main__":
    main()
