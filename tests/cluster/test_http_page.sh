#!/usr/bin/env bash
# The status page at / (label `cluster`, docs/http.md): a coordinator and one worker on
# models/tiny, one job run, then headless Chromium loads the page, runs its JavaScript and
# dumps the DOM: the nodes table must list both nodes and the units table the units the plan
# put on each (the same plan `dsctl placement --json` shows); a screenshot is written to
# $DS_BUILD/test-status-page.png and must be a real PNG. Skips (77) without Chromium.
set -u
. "$(dirname "$0")/lib.sh"
trap cluster_cleanup EXIT
need_jq
CHROME=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$CHROME" ] || { echo "SKIP: no chromium (tools/install-deps.sh installs it)"; exit 77; }
fail=0
cluster_start "$DS_ROOT/models/tiny" 1 || { cluster_stop; exit 1; }
"$DSCTL" generate --max-tokens 8 "Hello" >/dev/null || { echo "FAIL: generate"; fail=1; }
url="http://127.0.0.1:$HTTP_PORT/"
chrome() {
    timeout 120 "$CHROME" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
        --no-first-run --user-data-dir="$CLUSTER_DIR/chrome" --virtual-time-budget=8000 "$@" \
        2>>"$CLUSTER_DIR/chrome.log"
}
chrome --dump-dom "$url" >"$CLUSTER_DIR/dom.html"
grep -q 'data-loaded="1"' "$CLUSTER_DIR/dom.html" || { echo "FAIL: the page's script did not render"; fail=1; }
placement=$("$DSCTL" placement --json)
for node in coord w1; do
    if grep -q "<tr data-node=\"$node\"><td>$node</td><td>" "$CLUSTER_DIR/dom.html"; then
        echo "ok   node $node in the nodes table"
    else
        echo "FAIL node $node missing from the page"; fail=1
    fi
    # every node's units as the plan says (its extra copies of hot experts included)
    want=$(echo "$placement" | jq -r --arg n "$node" '([.plan.units | to_entries[] | select(.value == $n)] | length) + ([(.plan.replicas // {}) | to_entries[] | .value[] | select(. == $n)] | length)')
    got=$(sed -n "s/.*<tr data-node=\"$node\" title=\"[^\"]*\"><td>$node<\/td><td>[^<]*<\/td><td class=\"num\">\([0-9]*\)<\/td>.*/\1/p" "$CLUSTER_DIR/dom.html" | head -n1)
    if [ -n "$want" ] && [ "$want" = "$got" ] && [ "$want" -gt 0 ]; then
        echo "ok   units of $node on the page: $got (plan: $want)"
    else
        echo "FAIL units of $node: page '$got', plan '$want'"; fail=1
    fi
done
for u in embed head 'attn\['; do
    grep -q "$u" "$CLUSTER_DIR/dom.html" || { echo "FAIL: unit $u not on the page"; fail=1; }
done
shot="$DS_BUILD/test-status-page.png"
rm -f "$shot"
(cd "$CLUSTER_DIR" && chrome --screenshot="$shot" --window-size=1280,1400 "$url" >/dev/null)
if [ -s "$shot" ] && [ "$(head -c 8 "$shot" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] &&
    [ "$(stat -c %s "$shot")" -gt 20000 ]; then
    echo "ok   screenshot $shot ($(stat -c %s "$shot") bytes)"
else
    echo "FAIL: no screenshot"; tail -n 5 "$CLUSTER_DIR/chrome.log"; fail=1
fi
exit $fail
