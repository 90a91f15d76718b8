#!/usr/bin/env python3
"""Trains the tiny DeepSeek-V3 model shipped in models/tiny/ and its reference data.

    python3 tools/train_tiny.py [--minutes 15] [--out models/tiny] [--ref tests/data/tiny_ref]

1. Corpus: the English fortune files of Debian's `fortunes` / `fortunes-min` packages
   (/usr/share/games/fortunes; BSD licence, see models/tiny/README.md). The offensive sets
   (fortunes-off) are not installed and not used; ASCII-art sets are skipped (not prose).
   Each fortune is one document; 5% of them (chosen by a seeded shuffle) are held out.
2. Tokenizer: byte-level BPE trained by HF tokenizers on the training split; all 256 byte
   symbols are in the vocabulary, plus BOS/EOS special tokens spelled as DeepSeek spells them.
3. Model: DeepseekV3ForCausalLM (MLA + MoE with grouped routing, a shared expert, a dense first
   layer, YaRN rope), trained on CPU for a fixed wall-clock budget. The router bias
   (e_score_correction_bias) is updated as in DeepSeek-V3's aux-loss-free balancing: after
   each step every expert's bias moves by BIAS_RATE towards equal load.
4. Saved in the hub layout (experts unfused, BF16 linear weights, fp32 router bias), reloaded
   by HF to check the logits, plus: train_log.tsv (loss curve), eval.json (held-out loss vs a
   unigram baseline), expert_load.json (per-layer routing counts on the held-out split).
5. Reference for the C engine: per prompt, HF's greedy continuation and float32 logits, in
   tests/data/tiny_ref/ (format in docs/tiny-model.md).
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_reference import fuse_back, hub_state  # noqa: E402  (same project: unfuse/refuse)

FORTUNE_DIR = "/usr/share/games/fortunes"
SKIP_SETS = {"art", "ascii-art", "translate-me"}
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
VOCAB = 3072
SEQ = 128
BATCH = 16
LR = 3e-3
BIAS_RATE = 1e-3
SEED = 20261129
PROMPTS = ["The meaning of life is", "Once upon a time", "A computer is",
           "Q: What do you call"]
REF_STEPS = 24


def read_fortunes():
    docs = []
    for name in sorted(os.listdir(FORTUNE_DIR)):
        p = os.path.join(FORTUNE_DIR, name)
        if "." in name or name in SKIP_SETS or not os.path.isfile(p):
            continue
        with open(p, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for d in text.split("\n%\n"):
            d = d.strip("\n%")
            if len(d.strip()) > 0:
                docs.append(d)
    return docs


def train_tokenizer(docs):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[BOS, EOS],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             show_progress=False)
    tok.train_from_iterator(docs, trainer=tr)
    return tok


def make_config(vocab):
    rope = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                original_max_position_embeddings=SEQ, beta_fast=32, beta_slow=1,
                mscale=1.0, mscale_all_dim=1.0)
    return DeepseekV3Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=640, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        max_position_embeddings=4 * SEQ, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, rope_parameters=rope, head_dim=16)


def hub_config(c):
    """config.json spelled as the DeepSeek-V3 hub checkpoint spells it."""
    r = dict(c.rope_parameters)
    return dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, moe_intermediate_size=c.moe_intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
        n_routed_experts=c.n_routed_experts, n_shared_experts=c.n_shared_experts,
        num_experts_per_tok=c.num_experts_per_tok, n_group=c.n_group, topk_group=c.topk_group,
        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        first_k_dense_replace=c.first_k_dense_replace, moe_layer_freq=1,
        routed_scaling_factor=c.routed_scaling_factor,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        rope_theta=r["rope_theta"], hidden_act="silu", attention_bias=False,
        num_nextn_predict_layers=0, torch_dtype="bfloat16",
        rope_scaling=dict(type="yarn", factor=r["factor"],
                          original_max_position_embeddings=r["original_max_position_embeddings"],
                          beta_fast=r["beta_fast"], beta_slow=r["beta_slow"],
                          mscale=r["mscale"], mscale_all_dim=r["mscale_all_dim"]))


def encode_docs(tok, docs):
    out = []
    for enc in tok.encode_batch(docs):
        out.extend([0] + enc.ids + [1])
    return np.array(out, dtype=np.int64)


def route_hooks(model, counts):
    """Counts each MoE layer's chosen experts (for balancing and the load statistics)."""
    hooks = []
    for li, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue
        counts[li] = torch.zeros(gate.e_score_correction_bias.shape[0], dtype=torch.float64)

        def hook(mod, inp, out, li=li):
            idx = out[2].reshape(-1)
            counts[li] += torch.bincount(idx, minlength=counts[li].shape[0]).double()
        hooks.append(gate.register_forward_hook(hook))
    return hooks


def evaluate(model, data, max_chunks=200):
    n = min((len(data) - 1) // SEQ, max_chunks)
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, BATCH):
            xs = [data[j * SEQ:(j + 1) * SEQ + 1] for j in range(i, min(n, i + BATCH))]
            x = torch.tensor(np.stack(xs))
            logits = model(x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            tot += loss.item()
            cnt += x[:, 1:].numel()
    return tot / cnt, cnt


def unigram_loss(train, held, vocab):
    """Cross-entropy (nats/token) of the held-out tokens under train-split unigram frequencies
    (add-one smoothing): the baseline a useful model must beat clearly."""
    freq = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    p = freq / freq.sum()
    tgt = held[1:]
    return float(-np.log(p[tgt]).mean())


def main():
    ap = argparse.ArgumentParser()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--out", default=os.path.join(root, "models", "tiny"))
    ap.add_argument("--ref", default=os.path.join(root, "tests", "data", "tiny_ref"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(SEED)
    random.seed(SEED)
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.ref, exist_ok=True)

    docs = read_fortunes()
    random.shuffle(docs)
    n_held = len(docs) // 20
    held_docs, train_docs = docs[:n_held], docs[n_held:]
    tok = train_tokenizer(train_docs)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump(dict(add_bos_token=True, add_eos_token=False,
                       bos_token=dict(__type="AddedToken", content=BOS, lstrip=False,
                                      normalized=True, rstrip=False, single_word=False),
                       eos_token=dict(__type="AddedToken", content=EOS, lstrip=False,
                                      normalized=True, rstrip=False, single_word=False),
                       clean_up_tokenization_spaces=False, model_max_length=4 * SEQ,
                       tokenizer_class="LlamaTokenizerFast", legacy=True), f, indent=2)
    vocab = tok.get_vocab_size()
    train = encode_docs(tok, train_docs)
    held = encode_docs(tok, held_docs)
    print(f"docs {len(docs)} (held {n_held}), train tokens {len(train)}, held {len(held)}, "
          f"vocab {vocab}", flush=True)

    c = make_config(vocab)
    model = DeepseekV3ForCausalLM(c).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params}", flush=True)
    counts = {}
    hooks = route_hooks(model, counts)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    nodecay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.05),
                             dict(params=nodecay, weight_decay=0.0)], lr=LR,
                            betas=(0.9, 0.95))
    budget = a.minutes * 60.0
    t0 = time.time()
    log = open(os.path.join(a.out, "train_log.tsv"), "w")
    log.write("step\tseconds\tlr\ttrain_loss\theld_loss\n")
    gen = np.random.default_rng(SEED)
    step = 0
    warm = 50
    ema = None
    while True:
        el = time.time() - t0
        if el > budget:
            break
        frac = min(1.0, el / budget)
        lr = LR * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = gen.integers(0, len(train) - SEQ - 1, size=BATCH)
        x = torch.tensor(np.stack([train[s:s + SEQ + 1] for s in starts]))
        model.train()
        for k in counts:
            counts[k].zero_()
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # aux-loss-free balancing: push overloaded experts' bias down
            for li, cnt in counts.items():
                b = model.model.layers[li].mlp.gate.e_score_correction_bias
                b += BIAS_RATE * torch.sign(cnt.mean() - cnt).float()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        step += 1
        held_s = ""
        if step % 100 == 0:
            model.eval()
            hl, _ = evaluate(model, held, max_chunks=32)
            held_s = f"{hl:.4f}"
            print(f"step {step} t {el:.0f}s lr {lr:.2e} loss {ema:.3f} held {hl:.3f}", flush=True)
        log.write(f"{step}\t{el:.1f}\t{lr:.3e}\t{loss.item():.4f}\t{held_s}\n")
        log.flush()
    log.close()

    # Save: hub layout, BF16 linear weights, fp32 router bias; then the in-memory model gets
    # the rounded weights so that every reference below is what the files hold.
    model.eval()
    hub = hub_state(model)
    saved = {}
    for k, v in hub.items():
        if k.endswith("e_score_correction_bias"):
            saved[k] = v.float().contiguous()
        else:
            saved[k] = v.to(torch.bfloat16).contiguous()
            hub[k] = saved[k].float()
    fuse_back(model, hub)
    save_file(saved, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(hub_config(c), f, indent=1)

    for k in counts:
        counts[k].zero_()
    held_loss, held_n = evaluate(model, held, max_chunks=10 ** 9)
    load = {f"layer{li}": [int(v) for v in cnt.tolist()] for li, cnt in counts.items()}
    base = unigram_loss(train, held, vocab)
    ev = dict(steps=step, seconds=round(time.time() - t0, 1), params=n_params,
              train_tokens=int(len(train)), held_tokens=int(held_n), vocab=vocab,
              held_loss_nats=round(held_loss, 4), held_ppl=round(math.exp(held_loss), 2),
              unigram_loss_nats=round(base, 4), unigram_ppl=round(math.exp(base), 2))
    with open(os.path.join(a.out, "eval.json"), "w") as f:
        json.dump(ev, f, indent=1)
    with open(os.path.join(a.out, "expert_load.json"), "w") as f:
        json.dump(dict(note="routed-expert selections per MoE layer on the held-out split "
                            "(each token picks num_experts_per_tok experts)", load=load), f,
                  indent=1)
    for hk in hooks:
        hk.remove()
    print(json.dumps(ev), flush=True)

    # HF must read the hub-layout files back to the same logits.
    m2 = DeepseekV3ForCausalLM.from_pretrained(a.out, dtype=torch.float32).eval()
    probe = torch.tensor([[0] + tok.encode(PROMPTS[0]).ids])
    with torch.no_grad():
        d = (model(probe).logits - m2(probe).logits).abs().max().item()
    assert d < 1e-5, f"HF reload differs by {d}"

    # Reference: greedy continuation + logits of every fed position (prompt then decode steps).
    with open(os.path.join(a.ref, "prompts.txt"), "w") as pf:
        for i, p in enumerate(PROMPTS):
            seq = [0] + tok.encode(p).ids
            n_prompt = len(seq)
            with torch.no_grad():
                for _ in range(REF_STEPS):
                    seq.append(int(torch.argmax(m2(torch.tensor([seq])).logits[0, -1])))
                logits = m2(torch.tensor([seq[:-1]])).logits[0].float().numpy()
            gen_ids = seq[n_prompt:]
            logits.astype("<f4").tofile(os.path.join(a.ref, f"ref_{i}.f32"))
            text = tok.decode(gen_ids, skip_special_tokens=False)
            with open(os.path.join(a.ref, f"ref_{i}.txt"), "w") as f:
                f.write(",".join(map(str, seq[:n_prompt])) + "\n")
                f.write(",".join(map(str, gen_ids)) + "\n")
            with open(os.path.join(a.ref, f"ref_{i}.prompt"), "w") as f:
                f.write(p)
            pf.write(f"{i}\t{p!r}\t{text!r}\n")
            print(f"[{i}] {p!r} -> {text!r}", flush=True)


if __name__ == "__main__":
    main()
