#!/usr/bin/env python3
"""Expected renderings of the chat templates in tests/data/chat/ by HF transformers.

For every template (*.jinja) and every conversation of tests/data/chat/conversations.json,
renders tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=g)
(g = False and True; for templates that read `thinking`, thinking = False and True) with the
shipped tokenizer (models/tiny: its bos_token / eos_token) and writes
tests/data/chat/expected.json, which tests/test_chat.c compares dsd_chat_render with. The
tests need neither this script nor transformers; rerun it when a template or a conversation
changes:  python3 tools/gen_chat_ref.py   (needs transformers and jinja2, no torch)
"""
import json
import os
import sys

from transformers import PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = os.path.join(ROOT, "tests", "data", "chat")


def main():
    tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(ROOT, "models", "tiny"))
    convs = json.load(open(os.path.join(CHAT, "conversations.json")))
    out = []
    for name in sorted(f[:-6] for f in os.listdir(CHAT) if f.endswith(".jinja")):
        tmpl = open(os.path.join(CHAT, name + ".jinja")).read()
        thinking_opts = [False, True] if "thinking" in tmpl else [False]
        for ci, conv in enumerate(convs):
            # V2's template knows no tool role (it drops such messages; dsd refuses them)
            if name == "deepseek_v2" and any(m["role"] == "tool" for m in conv):
                continue
            for gen in (False, True):
                for th in thinking_opts:
                    kw = {"thinking": th} if len(thinking_opts) > 1 else {}
                    text = tok.apply_chat_template(conv, chat_template=tmpl, tokenize=False,
                                                   add_generation_prompt=gen, **kw)
                    out.append({"template": name, "conversation": ci,
                                "add_generation_prompt": gen, "thinking": th, "text": text})
    with open(os.path.join(CHAT, "expected.json"), "w") as f:
        json.dump({"bos": tok.bos_token, "eos": tok.eos_token, "cases": out}, f,
                  ensure_ascii=False, indent=0)
        f.write("\n")
    print(f"{len(out)} renderings", file=sys.stderr)


if __name__ == "__main__":
    main()
