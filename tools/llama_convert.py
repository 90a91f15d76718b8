#!/usr/bin/env python3
"""llama_convert.py — llama.cpp's convert_hf_to_gguf.py, unmodified, for checkpoints whose
tokenizer it does not know by hash (reference data only; run with the converter's venv python).

convert_hf_to_gguf.py names a BPE pre-tokenizer by the SHA-256 of the ids its tokenizer gives
for a fixed test string and refuses any hash it does not list. models/tiny's tokenizer.json has
exactly GPT-2's pre-tokenizer (ByteLevel, use_regex true, no normaliser), which llama.cpp calls
"gpt-2" (LLAMA_VOCAB_PRE_TYPE_GPT2, the same regex), but its vocabulary is its own, so its hash
is new. This wrapper adds hashes to the converter's table (get_vocab_base_pre) and then runs
the converter's main() with the remaining arguments. Nothing else changes.

usage: llama_convert.py LLAMA_SRC HASH=PRE[,HASH=PRE...] CONVERTER-ARGS...
"""
import sys
from pathlib import Path


def main():
    if len(sys.argv) < 4:
        sys.exit("usage: llama_convert.py LLAMA_SRC HASH=PRE[,HASH=PRE...] CONVERTER-ARGS...")
    src = Path(sys.argv[1])
    extra = dict(kv.split("=", 1) for kv in sys.argv[2].split(",") if kv)
    sys.path.insert(0, str(src))
    sys.path.insert(1, str(src / "gguf-py"))
    import convert_hf_to_gguf as conv  # noqa: E402
    from conversion import base  # noqa: E402

    orig = base.TextModel.get_vocab_base_pre

    # the converter's own test string: a literal inside the function it hashes with
    import inspect
    import re
    from hashlib import sha256
    m = re.search(r"chktxt = '((?:[^'\\]|\\.)*)'", inspect.getsource(orig))
    chktxt = eval("'" + m.group(1) + "'")

    def get_vocab_base_pre(self, tokenizer):
        chkhsh = sha256(str(tokenizer.encode(chktxt)).encode()).hexdigest()
        if chkhsh in extra:
            return extra[chkhsh]
        return orig(self, tokenizer)

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(src / "convert_hf_to_gguf.py")] + sys.argv[3:]
    conv.main()


if __name__ == "__main__":
    main()
