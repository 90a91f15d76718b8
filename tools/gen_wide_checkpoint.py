#!/usr/bin/env python3
"""Makes v3w: a random DeepSeek-V3 checkpoint whose every weight matrix has a row width that is a
multiple of 256, so that llama-quantize can give each one a K-quant with whole 256-value
super-blocks (the test checkpoints of tools/gen_reference.py are 40-200 wide: too narrow).

Usage: tools/gen_wide_checkpoint.py OUTDIR     (writes OUTDIR/v3w/)

The shape is DeepSeek-V3's in miniature: hidden 256; q LoRA 256 and kv LoRA 256; 2 heads of
nope 256 + rope 64 (k_b rows are then 256 wide too) and value 128 (o_proj 2*128 = 256 wide);
3 layers, the first dense (intermediate 256); 8 routed experts of 256 and 1 shared, top 2 of
them from the best 2 of 4 groups by a sigmoid router with a correction bias, renormalised and
scaled by 2.5; YaRN rope as V3 has it (mscale = mscale_all_dim = 1). Vocabulary 256 (the
byte-level tokenizer is written by tools/gen_gguf_model_ref.sh).

Weights and reference come from tools/gen_reference.py's build(), with its init but for the
gain (randomize below: norms 1 + 0.2 N(0,1), embeddings N(0,1), the router bias 0.05 + 0.1 U,
every matrix N(0,1) / sqrt(fan_in), so behind the RMS norms activations stay O(1): logits have
std 1.0), the generator seeded by crc32 of the name, float32 hub-layout safetensors, HF
transformers' float32 logits for its two prompts (ref_<i>.txt / .f32) and a from_pretrained
read-back check. torch's CPU generator is deterministic for a given torch version, so a rerun
gives the same bytes (torch 2.15.0, transformers 5.24.0 for the committed GGUFs)."""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_reference  # noqa: E402

SPEC = dict(name="v3w", arch=3, hidden_size=256, q_lora_rank=256, kv_lora_rank=256,
            num_attention_heads=2, qk_nope_head_dim=256, qk_rope_head_dim=64, v_head_dim=128,
            num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=256,
            moe_intermediate_size=256, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=4, topk_group=2, norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                      beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0))


def randomize(model, s, gen):
    """gen_reference.randomize with gain 1 instead of 1.5 for the matrices: N(0,1)/sqrt(fan_in)
    keeps a projection's output at its input's variance. With 1.5 this model is far more
    sensitive to rounding (measured on prompt 1, teacher-forced, dsd's integer kernels against
    llama.cpp on the same Q8_0 file: median row max |diff| 0.30 on logits of std 1.5 and 8 of 32
    rows past 0.5, against 0.07 on std 1.0 and none with gain 1), so its tests would check
    little beyond the first few tokens."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith("norm.weight"):
                v.copy_(1.0 + 0.2 * torch.randn(v.shape, generator=gen))
            elif k.endswith("e_score_correction_bias"):
                v.copy_(0.05 + 0.1 * torch.rand(v.shape, generator=gen))
            elif k.endswith("embed_tokens.weight"):
                v.copy_(torch.randn(v.shape, generator=gen))
            else:
                v.copy_(torch.randn(v.shape, generator=gen) / math.sqrt(v.shape[-1]))


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUTDIR")
    torch.set_num_threads(1)
    gen_reference.randomize = randomize
    gen_reference.build(SPEC, sys.argv[1])


if __name__ == "__main__":
    main()
