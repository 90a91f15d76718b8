#!/usr/bin/env python3
"""Drives the coordinator's HTTP API with the real `openai` client and with curl (run by
tests/cluster/test_http.sh, which starts the cluster and sets the environment):
HTTP_URL, API_KEY, DS_MODEL (the model directory), DSD_ENDPOINT (for dsctl), DS_BUILD,
COORD_LOG, COORD_PID, TMPD. Every expectation comes from outside the server: `dsctl generate`
and `dsctl submit` (the ZeroMQ client path) for the tokens, HF `tokenizers` for the chat
prompt's ids, the rendering HF transformers made (tests/data/chat/expected.json) for the
chat text, prometheus_client's parser for /metrics. Exit status 1 on any failure."""
import json
import os
import socket
import subprocess
import sys
import time

import openai
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

URL = os.environ["HTTP_URL"]
KEY = os.environ["API_KEY"]
MODEL_DIR = os.environ["DS_MODEL"]
DSCTL = os.path.join(os.environ["DS_BUILD"], "client", "dsctl")
ROOT = os.environ["DS_ROOT"]
failures = 0


def check(ok, what, detail=""):
    global failures
    print(("ok   " if ok else "FAIL ") + what + (f": {detail}" if detail else ""), flush=True)
    if not ok:
        failures += 1


def curl(path, *args, key=KEY, body=None):
    """(status, body text) of one request made by curl."""
    cmd = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", URL + path]
    if key:
        cmd += ["-H", f"Authorization: Bearer {key}"]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    cmd += list(args)
    p = subprocess.run(cmd, input=body.encode() if isinstance(body, str) else body,
                       capture_output=True, timeout=60)
    out = p.stdout.decode("utf-8", "replace")
    text, _, code = out.rpartition("\n")
    return int(code or 0), text


def dsctl(*args):
    p = subprocess.run([DSCTL, *args], capture_output=True, text=True, timeout=60)
    return p.stdout


def dsctl_tokens(out):
    line = [l for l in out.splitlines() if l.startswith("tokens: ")][-1]
    return [int(x) for x in line[8:].split(",") if x]


def metrics():
    code, text = curl("/metrics")
    assert code == 200, (code, text[:200])
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(m, name, **labels):
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


client = openai.OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0, timeout=60)

# ---- models ----------------------------------------------------------------------------------
models = client.models.list()
ids = [m.id for m in models.data]
check(ids == [os.environ["MODEL_ID"]], "openai models.list: the hub repository's id", ids)
MODEL = ids[0]

# ---- completion, greedy: the same tokens as dsctl generate --------------------------------------
PROMPT = "Once upon a time"
m0 = metrics()
want_out = dsctl("generate", "--max-tokens", "24", PROMPT)
want_ids = dsctl_tokens(want_out)
want_text = want_out[: want_out.rindex("tokens: ")].rstrip("\n")
r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                              extra_body={"return_token_ids": True})
got_ids = r.choices[0].model_extra.get("token_ids") if r.choices[0].model_extra else None
check(got_ids == want_ids, "completion tokens == dsctl generate", f"{got_ids} vs {want_ids}")
check(r.choices[0].text == want_text, "completion text == dsctl generate's text",
      repr(r.choices[0].text))
check(r.usage.completion_tokens == len(want_ids) and r.usage.total_tokens ==
      r.usage.prompt_tokens + r.usage.completion_tokens, "completion usage", r.usage)
tk = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
n_prompt = len(tk.encode(PROMPT, add_special_tokens=False).ids) + 1  # + BOS
check(r.usage.prompt_tokens == n_prompt, "prompt_tokens counts BOS + the prompt's tokens",
      f"{r.usage.prompt_tokens} vs {n_prompt}")
want_finish = "length" if len(want_ids) == 24 else "stop"
check(r.choices[0].finish_reason == want_finish, "finish_reason", r.choices[0].finish_reason)
full_text = r.choices[0].text

# the same, streamed, with usage at the end
chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                        temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
text = "".join(c.choices[0].text for c in chunks if c.choices)
check(text == full_text, "streamed completion == non-streamed", repr(text))
check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(want_ids)
      and not chunks[-1].choices, "stream_options.include_usage: a last chunk with usage")
finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
check(finishes[-1] == want_finish and all(f is None for f in finishes[:-1]),
      "streamed finish_reason only on the last choice chunk", finishes)

# raw SSE with curl: data: lines, [DONE] last
code, sse = curl("/v1/completions", "-N", body=json.dumps(
    {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}))
events = [l for l in sse.split("\n") if l]
check(code == 200 and events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events),
      "curl SSE: data: lines ending with data: [DONE]", events[-2:])

# ---- stop strings ----------------------------------------------------------------------------
words = full_text.split(" ")
stop = " " + words[3] if len(words) > 4 else full_text[5:8]
cut = full_text[: full_text.index(stop)]
r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                              stop=[stop, "\u2603never"])
check(r.choices[0].text == cut and r.choices[0].finish_reason == "stop",
      f"stop {stop!r}: text cut before it, finish_reason stop", repr(r.choices[0].text))
chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                        temperature=0, stop=stop, stream=True))
text = "".join(c.choices[0].text for c in chunks if c.choices)
check(text == cut and chunks[-1].choices[0].finish_reason == "stop", "streamed stop string",
      repr(text))

# ---- chat: the template's text, HF's ids, dsctl submit's tokens ----------------------------------
exp = json.load(open(os.path.join(ROOT, "tests/data/chat/expected.json")))
convs = json.load(open(os.path.join(ROOT, "tests/data/chat/conversations.json")))
rendered = [c["text"] for c in exp["cases"] if c["template"] == "deepseek_v3" and
            c["conversation"] == 3 and c["add_generation_prompt"]][0]
want_prompt = tk.encode(rendered, add_special_tokens=False).ids
r = client.chat.completions.create(model=MODEL, messages=convs[3], max_tokens=16, temperature=0,
                                   extra_body={"return_token_ids": True})
extra = r.model_extra or {}
check(extra.get("prompt_token_ids") == want_prompt,
      "chat prompt ids == HF tokenizers on HF's rendering of the template")
want = dsctl_tokens(dsctl("submit", "--stop-eos", "--max-tokens", "16", "--tokens",
                          ",".join(map(str, want_prompt))))
got = r.choices[0].model_extra.get("token_ids")
check(got == want, "chat tokens == dsctl submit of the same prompt", f"{got} vs {want}")
check(r.choices[0].message.role == "assistant" and r.object == "chat.completion" and
      r.usage.prompt_tokens == len(want_prompt), "chat answer shape and usage")
content = r.choices[0].message.content
chunks = list(client.chat.completions.create(model=MODEL, messages=convs[3], max_tokens=16,
                                             temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
deltas = [c.choices[0].delta for c in chunks if c.choices]
text = "".join(d.content or "" for d in deltas)
check(deltas[0].role == "assistant" and text == content, "streamed chat == non-streamed",
      repr(text))
check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(want),
      "streamed chat usage")
# sampling fields are accepted (a seeded sample is reproducible)
a = client.chat.completions.create(model=MODEL, messages=convs[0], max_tokens=12,
                                   temperature=0.8, top_p=0.9, seed=7,
                                   extra_body={"top_k": 20})
b = client.chat.completions.create(model=MODEL, messages=convs[0], max_tokens=12,
                                   temperature=0.8, top_p=0.9, seed=7,
                                   extra_body={"top_k": 20})
check(a.choices[0].message.content == b.choices[0].message.content,
      "temperature/top_p/top_k/seed: the same seed gives the same sample")

# ---- counters moved ----------------------------------------------------------------------------
m1 = metrics()
gen_delta = metric(m1, "dsd_generation_tokens_total") - metric(m0, "dsd_generation_tokens_total")
check(gen_delta >= 24 * 2 and metric(m1, "dsd_time_to_first_token_seconds_count") >
      metric(m0, "dsd_time_to_first_token_seconds_count"),
      "/metrics parses and its counters moved", f"+{gen_delta} generated tokens")
for ep, n in (("/v1/completions", 5), ("/v1/chat/completions", 4)):
    d = (metric(m1, "dsd_http_requests_total", endpoint=ep, code="2xx") -
         metric(m0, "dsd_http_requests_total", endpoint=ep, code="2xx"))
    check(d == n, f"dsd_http_requests_total counts the {n} requests to {ep}", d)
check(metric(m1, "dsd_serving") == 1 and metric(m1, "dsd_plan_version") >= 1 and
      metric(m1, "dsd_node_state", node="w1", role="worker", state="serving") == 1,
      "cluster gauges: serving, plan version, node states")
check(any(k[0] == "dsd_expert_routed_total" and v > 0 for k, v in m1.items()),
      "expert routing counts exported")

# ---- a client that hangs up cancels its job ----------------------------------------------------
before = metric(m1, "dsd_request_success_total", finish_reason="cancelled")
host, port = URL[7:].split(":")
body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "temperature": 0,
                   "stream": True}).encode()
s = socket.create_connection((host, int(port)))
s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
          KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: " +
          str(len(body)).encode() + b"\r\n\r\n" + body)
got = b""
while b"data: " not in got:
    got += s.recv(4096)
s.close()
cancelled = False
for _ in range(200):  # bounded wait for the server to notice
    m = metrics()
    if metric(m, "dsd_request_success_total", finish_reason="cancelled") > before:
        cancelled = True
        break
    time.sleep(0.05)
jobs = json.loads(dsctl("jobs", "--json") or "{}")
check(cancelled and not jobs.get("jobs") and
      "cancelled: its client is gone" in open(os.environ["COORD_LOG"]).read(),
      "a streaming client that hangs up: its job is cancelled, no job left running")
fin = [l for l in open(os.environ["COORD_LOG"]) if "finished (cancelled)" in l]
check(fin and int(fin[-1].split("after ")[1].split()[0]) < 400,
      "the cancelled job stopped early", fin[-1].strip() if fin else "no line")

# ---- with the worker stopped (SIGSTOP), jobs cannot progress: deterministic holds -------------
# round-robin puts attention on the worker, so no job produces a token while it is stopped;
# heartbeat_misses is high enough that it is not declared failed meanwhile
import signal

W1 = int(os.environ["W1_PID"])


def raw_request(path, payload):
    body = json.dumps(payload).encode()
    sk = socket.create_connection((host, int(port)))
    sk.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               .encode() + body)
    return sk


def wait_jobs(n):
    for _ in range(400):  # bounded
        if len(json.loads(dsctl("jobs", "--json") or "{}").get("jobs", [])) == n:
            return True
        time.sleep(0.05)
    return False


def log_count(text):
    return open(os.environ["COORD_LOG"]).read().count(text)


os.kill(W1, signal.SIGSTOP)
try:
    # a non-streamed request whose client hangs up while it waits
    gone0 = log_count("cancelled: its client is gone")
    sk = raw_request("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 100})
    held = wait_jobs(1)
    sk.close()
    noticed = False
    for _ in range(200):
        if log_count("cancelled: its client is gone") > gone0:
            noticed = True
            break
        time.sleep(0.05)
    check(held and noticed, "a non-streamed client that hangs up while its job waits: cancelled")
    # max_jobs (4 here) running: the next request is 429
    socks = [raw_request("/v1/chat/completions", {"model": MODEL, "messages": convs[0],
                                                   "max_tokens": 50, "stream": True})
             for _ in range(3)]
    full = wait_jobs(4)  # the three and the cancelled one, still in flight
    code, text = curl("/v1/completions", body=json.dumps({"model": MODEL, "prompt": "x"}))
    check(full and code == 429 and json.loads(text)["error"]["type"] == "rate_limit_error",
          "max_jobs running: 429 rate_limit_error", f"{code} {text[:100]}")
    try:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        check(False, "openai client: 429 raises RateLimitError")
    except openai.RateLimitError:
        check(True, "openai client: 429 raises RateLimitError")
    for sk in socks:
        sk.close()
finally:
    os.kill(W1, signal.SIGCONT)
check(wait_jobs(0), "once the worker runs again every abandoned job ends: no job left")
m = metrics()
check(metric(m, "dsd_request_success_total", finish_reason="cancelled") >= before + 5,
      "dsd_request_success_total counts the 5 cancelled jobs")

# ---- bad requests: the right status, OpenAI's error shape, no crash ----------------------------
def bad(what, want, path="/v1/completions", key=KEY, body=None, method_args=()):
    code, text = curl(path, *method_args, key=key, body=body)
    try:
        err = json.loads(text)["error"]
        shaped = isinstance(err["message"], str) and "type" in err and "code" in err
    except Exception:
        shaped = False
    check(code == want and shaped, f"{what}: {want}", f"{code} {text[:120]}")


bad("bad JSON", 400, body='{"prompt": "x", ')
bad("not an object", 400, body="[1]")
bad("oversized body", 413, body=json.dumps({"prompt": "x" * 100000}))
bad("unknown model", 404, body=json.dumps({"model": "gpt-4", "prompt": "x"}))
bad("bad key", 401, key="sk-wrong", body=json.dumps({"prompt": "x"}))
bad("no key", 401, key=None, path="/v1/models")
bad("max_tokens past the context", 400, body=json.dumps({"prompt": "x", "max_tokens": 100000}))
bad("n = 2", 400, body=json.dumps({"prompt": "x", "n": 2}))
bad("chat without messages", 400, path="/v1/chat/completions", body="{}")
bad("a token id outside the vocabulary", 400, body=json.dumps({"prompt": [1, 2, 10 ** 9]}))
bad("GET on a POST route", 405, path="/v1/completions")
code, _ = curl("/v1/models", "-H", "X-Big: " + "a" * 100000)
check(code == 431, "a 100 kB header: 431 from libmicrohttpd's limit", code)
bad("unknown route", 404, path="/v2/nothing")
try:
    client.completions.create(model="nope", prompt="x")
    check(False, "openai client: unknown model raises NotFoundError")
except openai.NotFoundError as e:
    check(e.status_code == 404 and e.code == "model_not_found", "openai client: NotFoundError")
try:
    openai.OpenAI(base_url=URL + "/v1", api_key="sk-bad", max_retries=0).models.list()
    check(False, "openai client: bad key raises AuthenticationError")
except openai.AuthenticationError:
    check(True, "openai client: bad key raises AuthenticationError")

# ---- still alive and healthy -------------------------------------------------------------------
code, text = curl("/health", key=None)
check(code == 200 and json.loads(text)["status"] == "ok", "/health after it all: 200", text)
os.kill(int(os.environ["COORD_PID"]), 0)
sys.exit(1 if failures else 0)
