#!/usr/bin/env bash
# The HTTP API (label `cluster`, docs/http.md): a coordinator and one worker on models/tiny
# (given as a Hugging Face hub cache entry, org/name under $HF_HOME) with API keys,
# DeepSeek-V3's chat template, a small body limit, max_jobs = 4 and round-robin placement (the
# test stops the worker to hold jobs), driven by the real
# `openai` Python client (installed from PyPI into this test's own venv, kept in the build
# tree) and by curl: tests/cluster/http_client.py checks models, completions and chat
# completions (streaming and not) against `dsctl generate` / `dsctl submit`, stop strings,
# usage, a disconnect that cancels its job, bad requests, /metrics (prometheus_client's
# parser) and /health. Before that, a coordinator waiting for a worker that never comes must
# answer 503 with the reason. Skips (77) only when PyPI cannot be reached.
set -u
. "$(dirname "$0")/lib.sh"
trap cluster_cleanup EXIT
need_jq
fail=0

VENV="$DS_BUILD/test-venv-http"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai, prometheus_client, tokenizers" 2>/dev/null; then
    rm -rf "$VENV"
    python3 -m venv "$VENV" || { echo "python3 -m venv failed (python3-venv missing?)"; exit 1; }
    if ! timeout 300 "$VENV/bin/pip" install -q --disable-pip-version-check openai prometheus_client tokenizers \
        >"$CLUSTER_DIR/pip.log" 2>&1; then
        if grep -qiE "connection|resolve|network|timed out|No matching distribution" "$CLUSTER_DIR/pip.log"; then
            echo "SKIP: PyPI cannot be reached to install openai, prometheus_client, tokenizers:"
            tail -n 3 "$CLUSTER_DIR/pip.log"
            rm -rf "$VENV"
            exit 77
        fi
        echo "FAIL: pip install failed:"; tail -n 20 "$CLUSTER_DIR/pip.log"
        exit 1
    fi
fi

model="$DS_ROOT/models/tiny"
printf '# test keys\nsk-test-one\n\nsk-test-two\n' >"$CLUSTER_DIR/keys"

# a coordinator that waits for a worker: /health and the API answer 503 with the reason
"$DSD" --node=lonely --role=coordinator --expect_workers=1 --link_wait_ms=600000 \
    --control_bind="tcp://127.0.0.1:$((BASE_PORT + 10))" --client_bind="tcp://127.0.0.1:$((BASE_PORT + 11))" \
    --data_bind="tcp://127.0.0.1:$((BASE_PORT + 12))" --http_bind="0.0.0.0:$((BASE_PORT + 13))" \
    --model="$model" --state_dir="$CLUSTER_DIR/lonely" --threads=1 --calibrate=false \
    --discover_opencl=false >"$CLUSTER_DIR/lonely.log" 2>&1 &
CLUSTER_PIDS+=($!)
code=000
for _ in $(seq 100); do
    code=$(curl -s -o "$CLUSTER_DIR/h.json" -w '%{http_code}' "http://127.0.0.1:$((BASE_PORT + 13))/health") && break
    sleep 0.1
done
if [ "$code" = 503 ] && jq -e '.status == "unavailable" and (.reason | test("join"))' "$CLUSTER_DIR/h.json" >/dev/null; then
    echo "ok   /health while joining: 503 $(cat "$CLUSTER_DIR/h.json")"
else
    echo "FAIL /health while joining: $code $(cat "$CLUSTER_DIR/h.json" 2>/dev/null)"; fail=1
fi
code=$(curl -s -o "$CLUSTER_DIR/c.json" -w '%{http_code}' "http://127.0.0.1:$((BASE_PORT + 13))/v1/completions" \
    -d '{"prompt":"hi","max_tokens":2}')
if [ "$code" = 503 ] && jq -e '.error.message | test("not serving")' "$CLUSTER_DIR/c.json" >/dev/null; then
    echo "ok   completion while joining: 503 $(jq -c .error.message "$CLUSTER_DIR/c.json")"
else
    echo "FAIL completion while joining: $code $(cat "$CLUSTER_DIR/c.json")"; fail=1
fi
# asked for every address but without API keys: loopback only, and it says so
if grep -q "http: no http_api_keys_file: serving on loopback only (127.0.0.1), not 0.0.0.0:" "$CLUSTER_DIR/lonely.log"; then
    echo "ok   without http_api_keys_file, http_bind 0.0.0.0 serves loopback only (logged)"
else
    echo "FAIL: no loopback-only log line"; fail=1
fi
other=$(ip -4 -o addr show scope global 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -n1)
if [ -n "$other" ]; then
    if curl -s -m 5 -o /dev/null "http://$other:$((BASE_PORT + 13))/health"; then
        echo "FAIL: answered on $other without API keys"; fail=1
    else
        echo "ok   not reachable on $other"
    fi
fi
kill "${CLUSTER_PIDS[0]}"; wait "${CLUSTER_PIDS[0]}" 2>/dev/null; CLUSTER_PIDS=()

# the model as a Hugging Face hub cache entry: HF_HOME/hub/models--dsd-test--tiny, its files
# links into blobs as huggingface_hub makes them; an older snapshot must not be taken
hub="$CLUSTER_DIR/hf/hub/models--dsd-test--tiny"
mkdir -p "$hub/blobs" "$hub/snapshots/0ld" "$hub/snapshots/c0ffee"
for f in "$model"/*; do
    cp "$f" "$hub/blobs/$(basename "$f").blob"
    ln -s "../../blobs/$(basename "$f").blob" "$hub/snapshots/c0ffee/$(basename "$f")"
done
touch -d '2020-01-01' "$hub/snapshots/0ld"
export HF_HOME="$CLUSTER_DIR/hf"
unset HF_HUB_CACHE
cluster_start dsd-test/tiny 1 --http_api_keys_file="$CLUSTER_DIR/keys" \
    --chat_template_file="$DS_ROOT/tests/data/chat/deepseek_v3.jinja" --http_max_body_bytes=65536 \
    --plan_strategy=round-robin --max_jobs=4 --heartbeat_misses=100 ||
    { cluster_stop; exit 1; }
grep -q "model dsd-test/tiny: the hub cache snapshot $hub/snapshots/c0ffee" "$CLUSTER_DIR/coord.log" ||
    { echo "FAIL: the hub cache entry was not resolved to its newest snapshot"; fail=1; }
grep -q "http: OpenAI API on http://127.0.0.1:$HTTP_PORT/v1" "$CLUSTER_DIR/coord.log" ||
    { echo "FAIL: no HTTP server line in the log"; fail=1; }

DS_MODEL="$model" MODEL_ID=dsd-test/tiny HTTP_URL="http://127.0.0.1:$HTTP_PORT" API_KEY=sk-test-two \
    COORD_LOG="$CLUSTER_DIR/coord.log" COORD_PID="${CLUSTER_PIDS[0]}" W1_PID="${CLUSTER_PIDS[1]}" TMPD="$CLUSTER_DIR" \
    timeout 300 "$VENV/bin/python" "$(dirname "$0")/http_client.py" || fail=1

kill -0 "${CLUSTER_PIDS[0]}" 2>/dev/null || { echo "FAIL: the coordinator died"; fail=1; }
exit $fail
