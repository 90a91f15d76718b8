#!/usr/bin/env bash
# Runs every benchmark built in build/bench. Each prints its own side-by-side comparison.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
for b in build/bench/bench_*; do
  [ -x "$b" ] && [ -f "$b" ] || continue
  echo "===== $(basename "$b") ====="
  "$b" "$@" || status=1
done
for s in bench/bench_*.sh; do
  [ -f "$s" ] || continue
  echo "===== $(basename "$s") ====="
  bash "$s" || status=1
done
exit $status
