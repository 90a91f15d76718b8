#!/usr/bin/env python3
"""gen_gguf_ref.py — GGUF reference data for tests/test_gguf.c and seeds for tests/fuzz_gguf.c.

Writes, with the PyPI `gguf` package (llama.cpp's gguf-py) and numpy:

  tests/data/gguf/quants.gguf       metadata of every value type and tensors of every type the
                                    C reference dequantisers handle (F32, F16, BF16, Q4_0, Q4_1,
                                    Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): "q.<T>" is
                                    random normal data quantised by gguf.quants.quantize (the
                                    types it can quantise), "r.<T>" random block bytes with
                                    finite random F16 scales (every type; the only source for the
                                    K-quants, which gguf-py cannot quantise), plus a 1-D, a 3-D
                                    and an IQ4_NL tensor (parsed, no C dequantiser)
  tests/data/gguf/quants_ref.gguf   for each tensor of quants.gguf that C dequantises, an F32
                                    tensor of the same name and shape holding
                                    gguf.quants.dequantize() of it: the bit-exact reference
  tests/data/gguf/align64.gguf      a small file with general.alignment = 64
  tests/data/gguf/split-0000K-of-00003.gguf  a split set written by GGUFWriter(split_max_tensors)
  tests/corpus/gguf/*.gguf          small seeds for the fuzz target

and, when llama.cpp's llama-quantize is at hand (--llama-quantize PATH, else
`tools/llama-cpp.sh bin llama-quantize`; skipped, keeping the committed files, when neither):

  tests/data/gguf/llama-Q2_K.gguf, llama-Q3_K_M.gguf   a 1-layer llama-architecture model of
                                    random F32 weights quantised by llama.cpp itself (its C++
                                    writer and its real K-quant search; together they hold
                                    Q2_K, Q3_K, Q4_K, Q5_K and Q6_K tensors)
  tests/data/gguf/llama.fnv         per tensor of those files: type, element count and the
                                    FNV-1a 64 hash of gguf-py's numpy dequantisation (a hash
                                    keeps the committed reference small)

CI has no numpy: the outputs are committed and the C test only reads them. Deterministic for a
seed. Run from the repository root:

  python3 -m venv build-gguf-venv && build-gguf-venv/bin/pip install gguf numpy
  build-gguf-venv/bin/python tools/gen_gguf_ref.py
"""
import argparse
import os
import subprocess
import sys
import tempfile
from importlib.metadata import version

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T, GGUFValueType as V

QK_K = 256

# Byte ranges of the F16 fields (scales, mins) inside one block of each type (ggml-common.h).
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ4_NL: [0],
}
C_TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
           T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]


def finite_f16(rng, n):
    """n random F16 bit patterns, any finite value (subnormals, +-0, up to +-65504) for half of
    them, typical weight scales for the other half."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0xBFFF, bits)  # exponent 31 -> 15
    typical = (rng.standard_normal(n) * 0.02).astype(np.float16).view(np.uint16)
    return np.where(np.arange(n) % 2 == 0, bits, typical).astype(np.uint16)


def random_blocks(rng, qtype, rows, cols):
    """Random bytes shaped (rows, cols / block * block_bytes) with sane F16 fields."""
    bv, bb = gguf.GGML_QUANT_SIZES[qtype]
    nblk = rows * cols // bv
    raw = rng.integers(0, 256, size=(nblk, bb), dtype=np.uint16).astype(np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off:off + 2] = finite_f16(rng, nblk).view(np.uint8).reshape(nblk, 2)
    return raw.reshape(rows, cols // bv * bb)


def plain_random(rng, qtype, rows, cols):
    """F32/F16/BF16 bit patterns including specials (inf, NaN with payloads, subnormals, -0)."""
    n = rows * cols
    if qtype == T.F32:
        bits = rng.integers(0, 1 << 32, size=n, dtype=np.uint64).astype(np.uint32)
        bits[:6] = [0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001, 0x00000001, 0x80000000]
        return bits.view(np.float32).reshape(rows, cols)
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    bits[:8] = [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFD55, 0x0001, 0x83FF, 0x8000]
    if qtype == T.F16:
        return bits.view(np.float16).reshape(rows, cols)
    return bits.view(np.uint8).reshape(rows, cols * 2)  # BF16: raw bytes


def add_metadata(w):
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 3.140625)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "h\u00e9llo w\u00f6rld")
    w.add_uint64("test.u64", (1 << 63) + 5)
    w.add_int64("test.i64", -(1 << 62))
    w.add_float64("test.f64", 2.5)
    w.add_key_value("test.arr_i32", [1, -2, 3], V.ARRAY, sub_type=V.INT32)
    w.add_key_value("test.arr_u8", [7, 8, 9, 10], V.ARRAY, sub_type=V.UINT8)
    w.add_key_value("test.arr_f32", [0.5, -1.25], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("test.arr_bool", [True, False, True], V.ARRAY, sub_type=V.BOOL)
    w.add_key_value("test.arr_str", ["a", "", "tokens \u2581x"], V.ARRAY, sub_type=V.STRING)
    w.add_string("test.generator", f"gguf-py {version('gguf')}, numpy {np.__version__}")


def add_raw(w, name, data, qtype):
    """data: the uint8 block bytes (quantised types, BF16) or a float array (F32, F16)."""
    if data.dtype == np.uint8:
        w.add_tensor(name, data, raw_dtype=qtype)
    else:
        w.add_tensor(name, data)


def write(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gen_quants(out_dir, rng):
    path = os.path.join(out_dir, "quants.gguf")
    w = gguf.GGUFWriter(path, "test")
    add_metadata(w)
    for qt in QUANTIZABLE:  # 3 rows of 64 values, quantised by gguf-py itself
        x = rng.standard_normal((3, 64)).astype(np.float32)
        add_raw(w, f"q.{qt.name}", gguf.quants.quantize(x, qt), qt)
    for qt in C_TYPES:  # random blocks: 4 rows of 4 K-blocks or 8 small blocks
        bv = gguf.GGML_QUANT_SIZES[qt][0]
        cols = 4 * QK_K if bv == QK_K else 256
        if qt in (T.F32, T.F16, T.BF16):
            add_raw(w, f"r.{qt.name}", plain_random(rng, qt, 4, cols), qt)
        else:
            add_raw(w, f"r.{qt.name}", random_blocks(rng, qt, 4, cols), qt)
    add_raw(w, "shape.1d", rng.standard_normal(7).astype(np.float32), T.F32)
    q3 = gguf.quants.quantize(rng.standard_normal((3, 2, 64)).astype(np.float32), T.Q8_0)
    add_raw(w, "shape.3d", q3, T.Q8_0)  # ne = {64, 2, 3}
    add_raw(w, "unsupported.iq4_nl", random_blocks(rng, T.IQ4_NL, 1, 64), T.IQ4_NL)
    write(w)

    # The reference: numpy's dequantisation of what was written, read back as a reader sees it.
    r = gguf.GGUFReader(path)
    ref = gguf.GGUFWriter(os.path.join(out_dir, "quants_ref.gguf"), "test-ref")
    for t in r.tensors:
        if t.tensor_type not in C_TYPES:
            continue
        y = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        y = np.ascontiguousarray(y, dtype=np.float32)
        assert y.size == int(t.n_elements), t.name
        ref.add_tensor(t.name, y)
    write(ref)


def gen_small(path, rng, alignment=None, extra_kv=True):
    w = gguf.GGUFWriter(path, "seed")
    if alignment:
        w.add_custom_alignment(alignment)
    if extra_kv:
        w.add_uint32("seed.block_count", 2)
        w.add_float32("seed.eps", 1e-6)
        w.add_bool("seed.flag", False)
        w.add_key_value("seed.tokens", ["<s>", "a", "b"], V.ARRAY, sub_type=V.STRING)
        w.add_key_value("seed.ids", [1, 2], V.ARRAY, sub_type=V.UINT64)
    w.add_tensor("a.f32", rng.standard_normal(4).astype(np.float32))
    add_raw(w, "b.q8_0", gguf.quants.quantize(rng.standard_normal((1, 32)).astype(np.float32),
                                              T.Q8_0), T.Q8_0)
    add_raw(w, "c.q4_k", random_blocks(rng, T.Q4_K, 1, QK_K), T.Q4_K)
    add_raw(w, "d.q6_k", random_blocks(rng, T.Q6_K, 1, QK_K), T.Q6_K)
    write(w)


def gen_split(out_dir, rng):
    w = gguf.GGUFWriter(os.path.join(out_dir, "split.gguf"), "test", split_max_tensors=2)
    w.add_uint32("test.block_count", 5)
    for i in range(5):
        w.add_tensor(f"t{i}", np.full((2, 8), i, dtype=np.float32))
    write(w)


def fnv1a64(b):
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def find_llama_quantize(root, given):
    if given:
        return given
    try:
        out = subprocess.run([os.path.join(root, "tools", "llama-cpp.sh"), "bin", "llama-quantize"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def gen_llama(out_dir, rng, quantize):
    # The smallest model llama-quantize accepts: every row a whole K-block (256), one attn_v per
    # layer (it counts them against block_count).
    d = 256
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "f32.gguf")
        w = gguf.GGUFWriter(src, "llama")
        w.add_context_length(64)
        w.add_embedding_length(d)
        w.add_block_count(1)
        w.add_feed_forward_length(d)
        w.add_head_count(4)
        w.add_head_count_kv(4)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_file_type(0)
        for name in ("token_embd", "output", "blk.0.attn_v", "blk.0.attn_output",
                     "blk.0.ffn_down", "blk.0.ffn_up"):
            w.add_tensor(f"{name}.weight", (rng.standard_normal((d, d)) * 0.05).astype(np.float32))
        w.add_tensor("blk.0.attn_norm.weight", np.ones(d, dtype=np.float32))
        write(w)
        lines = [f"# gguf-py {version('gguf')}, numpy {np.__version__}; "
                 "file tensor type n_elements fnv1a64(numpy float32 bytes)"]
        for qt in ("Q2_K", "Q3_K_M"):
            dst = os.path.join(out_dir, f"llama-{qt}.gguf")
            log = subprocess.run([quantize, src, dst, qt], capture_output=True, text=True)
            if log.returncode:
                sys.exit(f"llama-quantize {qt} failed:\n{log.stdout}{log.stderr}")
            ver = next((l for l in log.stdout.splitlines() + log.stderr.splitlines()
                        if l.startswith("version:")), "version: ?")
            lines.append(f"# llama-{qt}.gguf: llama-quantize {ver[8:].strip()}")
            for t in gguf.GGUFReader(dst).tensors:
                y = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
                y = np.ascontiguousarray(y, dtype=np.float32)
                lines.append(f"llama-{qt}.gguf {t.name} {t.tensor_type.name} {y.size} "
                             f"{fnv1a64(y.tobytes()):016x}")
    with open(os.path.join(out_dir, "llama.fnv"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.getcwd(), help="repository root")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--llama-quantize", help="path of llama.cpp's llama-quantize")
    a = ap.parse_args()
    data = os.path.join(a.root, "tests", "data", "gguf")
    corpus = os.path.join(a.root, "tests", "corpus", "gguf")
    os.makedirs(data, exist_ok=True)
    os.makedirs(corpus, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    gen_quants(data, rng)
    gen_small(os.path.join(data, "align64.gguf"), rng, alignment=64)
    gen_split(data, rng)
    gen_small(os.path.join(corpus, "small.gguf"), rng)
    gen_small(os.path.join(corpus, "align64.gguf"), rng, alignment=64)
    gen_small(os.path.join(corpus, "tensors_only.gguf"), rng, extra_kv=False)
    quantize = find_llama_quantize(a.root, a.llama_quantize)
    if quantize:
        gen_llama(data, np.random.default_rng(a.seed + 1), quantize)
    else:
        print("no llama-quantize (tools/llama-cpp.sh build): kept the llama-*.gguf files",
              file=sys.stderr)
    print(f"gguf-py {version('gguf')}, numpy {np.__version__}: wrote {data} and {corpus}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
