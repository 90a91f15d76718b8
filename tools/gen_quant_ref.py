#!/usr/bin/env python3
"""Reference for the Q8_0 quantiser (model/quant.c, ds_quant_quantize_row): float32 inputs and
the bytes llama.cpp's gguf-py (PyPI `gguf`, numpy) `gguf.quants.quantize(x, Q8_0)` makes of them.
tests/test_quantize.c compares the C quantiser's bytes with these, so CI needs no Python.

    python3 -m venv build-gguf-venv && build-gguf-venv/bin/pip install gguf==0.19.0 numpy
    build-gguf-venv/bin/python tools/gen_quant_ref.py [--out tests/data/quant]

Writes q8_0_in.f32 (little-endian float32, rows of 256 values) and q8_0_ref.bin (their Q8_0
blocks, 34 bytes per 32 values). The rows cover: normal data of several scales, a zero block,
values whose scale is a subnormal or an overflowing f16, exact halves (ties of the rounding),
single spikes, all-negative blocks, and x*(1/d) values next to .5.
"""
import argparse
import os

import numpy as np
from gguf import GGMLQuantizationType, quants
import gguf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/data/quant")
    ap.add_argument("--seed", type=int, default=14)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    rows = []
    for scale in (1.0, 0.02, 3e-3, 40.0, 1e-6, 2e5):
        rows.append(rng.standard_normal(256) * scale)
    r = rng.standard_normal(256)
    r[:32] = 0  # a zero block
    rows.append(r)
    rows.append(rng.standard_normal(256) * 1e-9)  # d below f16's normal range
    rows.append(rng.standard_normal(256) * 1e7)  # d past 65504: inf in f16
    t = np.arange(256, dtype=np.float64) - 127.5  # many exact .5 ties for d = 1
    t[0] = 127.0
    rows.append(t)
    s = np.zeros(256)
    s[::32] = 5.0  # one spike per block
    s[5::32] = -0.01
    rows.append(s)
    rows.append(-np.abs(rng.standard_normal(256)))
    x = np.stack(rows).astype(np.float32)
    q = quants.quantize(x, GGMLQuantizationType.Q8_0)
    os.makedirs(a.out, exist_ok=True)
    x.astype("<f4").tofile(os.path.join(a.out, "q8_0_in.f32"))
    np.asarray(q, dtype=np.uint8).tofile(os.path.join(a.out, "q8_0_ref.bin"))
    with open(os.path.join(a.out, "README"), "w") as f:
        f.write("Made by tools/gen_quant_ref.py --seed %d with gguf %s, numpy %s.\n"
                % (a.seed, getattr(gguf, "__version__", "0.19.0"), np.__version__))


if __name__ == "__main__":
    main()
