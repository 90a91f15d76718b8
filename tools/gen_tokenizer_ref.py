#!/usr/bin/env python3
"""Reference token ids from HF tokenizers for tests/test_tokenizer.c.

    python3 tools/gen_tokenizer_ref.py [models/tiny/tokenizer.json] [tests/data/tokenizer]

Builds three tokenizers into tests/data/tokenizer/<name>/:
  tiny      the shipped model's tokenizer (ByteLevel pre-tokenizer with the GPT-2 regex,
            merges spelled ["a", "b"], BOS given as an AddedToken object in the config);
  v3style   a byte-level BPE trained here by HF tokenizers on the fortunes corpus plus some
            CJK text, with a DeepSeek-V3 style pre-tokenizer: Sequence of three Isolated Split
            regexes (digits in groups of up to 3, CJK runs, words/punctuation/whitespace; the
            regexes are written for this project from the V3 tokenizer's observable
            behaviour) then ByteLevel without regex; merges rewritten in the "a b" spelling;
            a non-special added token; BOS given as a plain string in the config;
  prefix    the tiny vocabulary with ByteLevel add_prefix_space=true and an lstrip/rstrip
            added token;
  behaviors the tiny vocabulary behind Splits with every behaviour (MergedWithPrevious,
            MergedWithNext, Removed, Contiguous, Isolated; Regex and String patterns).
and encodes every case of corpus.hex with each (encode(text, add_special_tokens=False)).

Invalid UTF-8: HF works on Python str, so a case's bytes are given to HF as
bytes.decode("utf-8", errors="replace") (each maximal invalid subpart -> one U+FFFD); the C
tokenizer applies the same rule itself. Output per tokenizer, expected.txt, one line per
corpus case: comma-separated ids ("-" when none), a TAB, then the hex of HF's decode of
those ids (skip_special_tokens=False).
"""
import json
import os
import random
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

V3_DIGITS = r"\p{N}{1,3}"
V3_CJK = r"[一-龥぀-ゟ゠-ヿ]+"
V3_MAIN = (r"[\r\n]|\s?[\p{L}\p{M}]+|\s?[\p{P}\p{S}]+|[^\s\p{L}\p{M}\p{P}\p{S}\p{N}]+"
           r"|\s+(?!\S)|\s+")

CJK_TEXT = [
    "日本語のテキストを少し書きます。東京は日本の首都です。",
    "我们今天去公园散步，天气很好。中文字符和标点符号。",
    "カタカナとひらがなが混ざった文章です。コンピューター。",
    "한국어 문장도 조금 있습니다.",
]


def corpus_cases():
    c = [
        "Hello, world!", "The meaning of life is", "  leading spaces", "trailing   ",
        "a\n\nb\r\nc\n", "tabs\t\tand\tspaces   \t x", "!!!???...,,,;;:--", "(((x)))[[]]{{}}",
        "12345678901", "3.14159 and 2,000,000 and 007", "日本語のテキスト、中文字符。",
        "한국어 문장", "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷", "NBSP\u00a0here\u00a0\u00a0x \u00a0y",
        "café naïve Ελληνικά русский текст", "it's I'm they'll we've he'd she's",
        "don't DON'T Don'T", BOS + "Hi there" + EOS, "ab" + EOS + "cd" + EOS + EOS,
        "", " ", "\n", "   \n   ", "a" * 300, " " * 2000 + "x", "x" + "\t " * 50,
        "def f(x):\n    return x**2  # square\n", "C:\\path\\to\\file.txt <tag attr=\"v\">",
        "mixed日本English中文123abc", "Zero\u200bwidth\u200djoiner", "ﬁ ligature ½ ² Ⅻ ٣٤٥",
        "e\u0301 combining a\u0308", "\u3000ideographic space\u3000", "line\u2028sep\u2029par",
        "Q: What do you call a fish with no eyes?\nA: A fsh.",
        "<think>reasoning</think> answer", "x<think>y", "  <mask>  z <mask>",
    ]
    c = [s.encode("utf-8") for s in c]
    c += [b"\xff\xfe abc", b"caf\xc3", b"\xe2\x82 euro", b"\xed\xa0\x80 surrogate",
          b"end \xf0\x9f\x98", b"ok\x80\x80ok", b"\xc0\xaf overlong", b"\xf4\x90\x80\x80 big",
          b"a\x00b nul"]
    rng = random.Random(7)
    for _ in range(6):
        c.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))))
    fort = "/usr/share/games/fortunes/wisdom"
    if os.path.exists(fort):
        with open(fort, encoding="utf-8", errors="replace") as f:
            docs = [d for d in f.read().split("\n%\n") if d.strip()]
        for d in docs[:12]:
            c.append(d.encode("utf-8"))
    return c


def v3style(train_docs):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(V3_DIGITS),
                             behavior="isolated", invert=False),
        pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(V3_CJK),
                             behavior="isolated", invert=False),
        pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(V3_MAIN),
                             behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=2000, special_tokens=[BOS, EOS],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             show_progress=False)
    tok.train_from_iterator(train_docs, trainer=tr)
    from tokenizers import AddedToken
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    d = json.loads(tok.to_str())
    d["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m
                            for m in d["model"]["merges"]]
    return d


def main():
    tiny_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "models", "tiny",
                                                                   "tokenizer.json")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "tests", "data", "tokenizer")
    os.makedirs(out, exist_ok=True)
    with open(tiny_path) as f:
        tiny = json.load(f)

    docs = []
    fdir = "/usr/share/games/fortunes"
    for name in ["fortunes", "wisdom", "science", "computers", "literature"]:
        with open(os.path.join(fdir, name), encoding="utf-8", errors="replace") as f:
            docs += [d for d in f.read().split("\n%\n") if d.strip()]
    docs += CJK_TEXT * 20

    prefix = json.loads(json.dumps(tiny))
    prefix["pre_tokenizer"] = dict(type="ByteLevel", add_prefix_space=True, trim_offsets=True,
                                   use_regex=True)
    nid = max(prefix["model"]["vocab"].values()) + 1
    prefix["added_tokens"].append(dict(id=nid, content="<mask>", single_word=False,
                                       lstrip=True, rstrip=True, normalized=False,
                                       special=True))

    # Every Split behaviour, on the tiny vocabulary (HF must agree on each).
    behav = json.loads(json.dumps(tiny))
    def split(pat, beh, lit=False):
        return dict(type="Split", pattern={"String" if lit else "Regex": pat}, behavior=beh,
                    invert=False)
    behav["pre_tokenizer"] = dict(type="Sequence", pretokenizers=[
        split(r"\p{N}+", "MergedWithPrevious"), split(r"[.,!?;:]", "MergedWithNext"),
        split("\t", "Removed", lit=True), split("-", "Contiguous", lit=True),
        split(r"\s+", "Isolated"),
        dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=True)])

    toks = {
        "tiny": (tiny, dict(add_bos_token=True, bos_token=dict(content=BOS, __type="AddedToken"),
                            eos_token=dict(content=EOS, __type="AddedToken"))),
        "v3style": (v3style(docs), dict(add_bos_token=True, bos_token=BOS, eos_token=EOS)),
        "prefix": (prefix, dict(add_bos_token=False, bos_token=BOS, eos_token=EOS)),
        "behaviors": (behav, dict(add_bos_token=False)),
    }
    cases = corpus_cases()
    with open(os.path.join(out, "corpus.hex"), "w") as f:
        for c in cases:
            f.write((c.hex() or "-") + "\n")
    for name, (tj, cfg) in toks.items():
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        s = json.dumps(tj, ensure_ascii=False, indent=1)
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            f.write(s)
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, ensure_ascii=False, indent=1)
        tok = Tokenizer.from_str(s)
        with open(os.path.join(d, "expected.txt"), "w") as f:
            for c in cases:
                text = c.decode("utf-8", errors="replace")
                ids = tok.encode(text, add_special_tokens=False).ids
                dec = tok.decode(ids, skip_special_tokens=False).encode("utf-8")
                f.write((",".join(map(str, ids)) or "-") + "\t" + (dec.hex() or "-") + "\n")
        print(f"{name}: {len(cases)} cases, vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
