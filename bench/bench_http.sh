#!/usr/bin/env bash
# bench_http.sh — the HTTP API under load, in one run on this machine: a coordinator and N
# workers on loopback (models/tiny), C concurrent streaming chat clients (the async `openai`
# client, 64 by default) each generating T tokens, then the same jobs one at a time. Prints
# whether every client completed, the aggregate tokens/s of both runs and their ratio, and
# time to first token (p50/p90/max) under load against alone. Comparisons, not pass/fail
# (only a client that did not complete makes it exit 1).
# usage: DS_BUILD=build DS_ROOT=. bench/bench_http.sh [CLIENTS] [TOKENS] [WORKERS]
set -u
here=$(cd "$(dirname "$0")" && pwd)
: "${DS_ROOT:=$(cd "$here/.." && pwd)}"
: "${DS_BUILD:=$DS_ROOT/build}"
export DS_ROOT DS_BUILD
. "$DS_ROOT/tests/cluster/lib.sh"
trap cluster_cleanup EXIT
clients=${1:-64}
ntok=${2:-32}
workers=${3:-1}
VENV="$DS_BUILD/test-venv-http" # the one tests/cluster/test_http.sh makes
if ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
    python3 -m venv "$VENV" && "$VENV/bin/pip" install -q openai prometheus_client tokenizers ||
        { echo "bench_http: cannot install the openai package (PyPI unreachable?); skipped"; exit 0; }
fi
cluster_start "$DS_ROOT/models/tiny" "$workers" --max_jobs=$((clients > 64 ? clients : 64)) \
    --chat_template_file="$DS_ROOT/tests/data/chat/deepseek_v3.jinja" --http_max_connections=$((clients + 16)) ||
    exit 1
CLIENTS=$clients NTOK=$ntok URL="http://127.0.0.1:$HTTP_PORT/v1" "$VENV/bin/python" - <<'PY'
import asyncio, os, sys, time
import openai

C, T, URL = int(os.environ["CLIENTS"]), int(os.environ["NTOK"]), os.environ["URL"]
client = openai.AsyncOpenAI(base_url=URL, api_key="none", max_retries=0, timeout=600)
prompts = [f"Story number {i}: once upon a time" for i in range(C)]

async def one(i):
    t0 = time.perf_counter()
    ttft, n, usage = None, 0, None
    stream = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompts[i]}], max_tokens=T,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    async for ch in stream:
        if ttft is None and ch.choices and ch.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if ch.usage:
            usage = ch.usage
    return ttft or (time.perf_counter() - t0), usage.completion_tokens if usage else 0

async def run(concurrent):
    t0 = time.perf_counter()
    if concurrent:
        res = await asyncio.gather(*(one(i) for i in range(C)), return_exceptions=True)
    else:
        res = []
        for i in range(C):
            try:
                res.append(await one(i))
            except Exception as e:
                res.append(e)
    wall = time.perf_counter() - t0
    ok = [r for r in res if not isinstance(r, Exception)]
    errs = [r for r in res if isinstance(r, Exception)]
    toks = sum(r[1] for r in ok)
    ttfts = sorted(r[0] for r in ok)
    return len(ok), errs, toks, wall, ttfts

def pct(v, p):
    return v[min(len(v) - 1, int(p * len(v)))] if v else float("nan")

async def main():
    n1, e1, tok1, w1, tt1 = await run(True)
    n2, e2, tok2, w2, tt2 = await run(False)
    print(f"{C} concurrent streaming chat clients, {T} tokens each (models/tiny, loopback)")
    print(f"  completed: {n1}/{C} concurrent, {n2}/{C} one at a time")
    for e in (e1 + e2)[:3]:
        print(f"  error: {e!r}")
    r1, r2 = tok1 / w1, tok2 / w2
    print(f"  aggregate tokens/s: concurrent {r1:.0f}, one at a time {r2:.0f} (ratio {r1 / r2:.2f})")
    print(f"  time to first token, concurrent: p50 {pct(tt1, .5) * 1e3:.1f} ms, p90 "
          f"{pct(tt1, .9) * 1e3:.1f} ms, max {tt1[-1] * 1e3:.1f} ms; alone: p50 "
          f"{pct(tt2, .5) * 1e3:.1f} ms")
    sys.exit(0 if n1 == C and n2 == C else 1)

asyncio.run(main())
PY
