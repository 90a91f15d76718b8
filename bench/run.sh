#!/usr/bin/env bash
# Runs every benchmark built in build/bench. Each prints its own side-by-side comparison.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
for b in build/bench/bench_*; do
  [ -x "$b" ] && [ -f "$b" ] || continue
  # bench_engine needs a checkpoint argument; bench_vs_llama.sh below drives it.
  [ "$(basename "$b")" = bench_engine ] && continue
  echo "===== $(basename "$b") ====="
  "$b" "$@" || status=1
done
for s in bench/bench_*.sh; do
  [ -f "$s" ] || continue
  echo "===== $(basename "$s") ====="
  case "$(basename "$s")" in
    # a 1.3 GB checkpoint and minutes of runs: only worth it when there is a llama.cpp to compare
    bench_vs_llama.sh) bash "$s" --skip-without-llama || status=1 ;;
    *) bash "$s" || status=1 ;;
  esac
done
exit $status
