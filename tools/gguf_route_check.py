#!/usr/bin/env python3
"""Who is right where dsd and llama.cpp part on a quantised GGUF: the file's weights dequantised
by gguf-py, loaded into HF transformers' DeepseekV3ForCausalLM in float32 (the exact model of
the file), fed llama.cpp's tokens; its logits against llama.cpp's reference and against dsd's
(`dsctl generate --local --logits-out`, integer kernels and the dequantised float path), and per
fed row the smallest routing margin of the exact model over its MoE layers (the gap between the
last chosen and the first rejected group score, or expert score within the chosen groups).

Usage: tools/gguf_route_check.py FILE.gguf CONFIG_DIR [DSCTL]
  FILE.gguf   a deepseek2 GGUF of tests/data/gguf_ref with its FILE_<p>.txt / .f32 references
  CONFIG_DIR  the HF checkpoint it was converted from (its config.json is used), e.g. the
              OUTDIR/v3w of tools/gen_wide_checkpoint.py
  DSCTL       default build/client/dsctl
Run with the llama venv's python (tools/llama-cpp.sh python). Prints, per prompt, the maxima and
every row past 0.5 with the margin there; docs/gguf.md ("Test models") quotes its output for the
v3w files. A reference tool only: the test does not depend on it."""
import os
import shutil
import subprocess
import sys
import tempfile

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from safetensors.torch import save_file
from transformers import DeepseekV3ForCausalLM

ATTN = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
        "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
        "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_output": "self_attn.o_proj"}


def hf_state(path):
    """The GGUF's tensors, dequantised, under HF's hub names (experts unfused, kv_b rebuilt)."""
    t = {x.name: torch.from_numpy(np.ascontiguousarray(dequantize(x.data, x.tensor_type))
                                  .astype(np.float32)) for x in gguf.GGUFReader(path).tensors}
    sd = {"model.embed_tokens.weight": t["token_embd.weight"],
          "lm_head.weight": t["output.weight"], "model.norm.weight": t["output_norm.weight"]}
    i = 0
    while f"blk.{i}.attn_norm.weight" in t:
        b, p = f"blk.{i}.", f"model.layers.{i}."
        for g, h in ATTN.items():
            sd[p + h + ".weight"] = t[b + g + ".weight"]
        # the converter's split: k_b[h] = W_UK[h]^T ({dn, C} per head), v_b[h] = W_UV[h]
        kb, vb = t[b + "attn_k_b.weight"], t[b + "attn_v_b.weight"]
        sd[p + "self_attn.kv_b_proj.weight"] = torch.cat(
            [torch.cat([kb[h].T, vb[h]]) for h in range(kb.shape[0])]).contiguous()
        if b + "ffn_gate.weight" in t:
            for g in ("gate", "up", "down"):
                sd[p + f"mlp.{g}_proj.weight"] = t[b + f"ffn_{g}.weight"]
        else:
            sd[p + "mlp.gate.weight"] = t[b + "ffn_gate_inp.weight"]
            sd[p + "mlp.gate.e_score_correction_bias"] = t[b + "exp_probs_b.bias"]
            for g in ("gate", "up", "down"):
                sd[p + f"mlp.shared_experts.{g}_proj.weight"] = t[b + f"ffn_{g}_shexp.weight"]
                st = t[b + f"ffn_{g}_exps.weight"]
                for e in range(st.shape[0]):
                    sd[p + f"mlp.experts.{e}.{g}_proj.weight"] = st[e].contiguous()
        i += 1
    return {k: v.contiguous() for k, v in sd.items()}


def route_margin(logits, bias, n_group, topk_group, top_k):
    """V3's noaux_tc choice: per token the smaller of the group and the expert margins."""
    s = torch.sigmoid(logits) + bias
    n, e = s.shape
    g = s.view(n, n_group, -1).topk(2, dim=-1).values.sum(-1)
    gs = g.sort(-1, descending=True).values
    gm = gs[:, topk_group - 1] - gs[:, topk_group]
    keep = torch.zeros(n, n_group, dtype=torch.bool)
    keep.scatter_(1, g.topk(topk_group, -1).indices, True)
    es = s.masked_fill(~keep.repeat_interleave(e // n_group, 1), -1e9).sort(-1, descending=True)
    return torch.minimum(gm, es.values[:, top_k - 1] - es.values[:, top_k])


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    path, cfg_dir = sys.argv[1], sys.argv[2]
    dsctl = sys.argv[3] if len(sys.argv) > 3 else "build/client/dsctl"
    stem = path[: -len(".gguf")]
    tmp = tempfile.mkdtemp()
    try:
        shutil.copy(os.path.join(cfg_dir, "config.json"), tmp)
        save_file(hf_state(path), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        model = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        c = model.config
        caps = {}
        for i, layer in enumerate(model.model.layers):
            if hasattr(layer.mlp, "gate"):
                def hook(mod, inp, out, i=i):
                    x = inp[0].reshape(-1, inp[0].shape[-1])
                    caps[i] = (x @ mod.weight.T, mod.e_score_correction_bias.clone())
                layer.mlp.gate.register_forward_hook(hook)
        for p in (0, 1):
            lines = open(f"{stem}_{p}.txt").read().split("\n")
            prompt = [int(x) for x in lines[0].split(",")]
            ref = [int(x) for x in lines[1].split(",")]
            feed = prompt + ref[:-1]
            first, rows = len(prompt) - 1, len(ref)
            with torch.no_grad():
                hf = model(torch.tensor([feed])).logits[0].numpy()[first:first + rows]
            mg = torch.stack([route_margin(*caps[i], c.n_group, c.topk_group,
                                           c.num_experts_per_tok) for i in sorted(caps)])
            mg = mg.min(0).values.numpy()[first:first + rows]
            ll = np.fromfile(f"{stem}_{p}.f32", "<f4").reshape(rows, -1)
            d = {"llama.cpp": np.abs(hf - ll).max(1)}
            for mode in ("int8", "dequant"):
                out = os.path.join(tmp, f"dsd_{mode}.f32")
                subprocess.run([dsctl, "generate", "--local", "--model", path, "--tokens",
                                ",".join(map(str, feed)), "--max-tokens", "1", "--threads", "2",
                                "--logits-out", out], env=dict(os.environ, DS_QDOT=mode),
                               check=True, capture_output=True)
                lg = np.fromfile(out, "<f4").reshape(-1, ll.shape[1])[first:first + rows]
                d["dsd " + mode] = np.abs(hf - lg).max(1)
            print(f"{os.path.basename(path)} prompt {p}: max |exact - x|: " +
                  ", ".join(f"{k} {v.max():.5f}" for k, v in d.items()))
            for r in range(rows):
                if max(v[r] for v in d.values()) > 0.5:
                    print(f"  row {r:2d}: " + ", ".join(f"{k} {v[r]:.3f}" for k, v in d.items()) +
                          f"; routing margin {mg[r]:.4f}")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
