#!/usr/bin/env bash
# tools/llama-cpp.sh — llama.cpp for side-by-side benchmarks and reference data ONLY.
#
# dsd never links, loads or calls llama.cpp: this script builds it beside the project so that
# bench/ can time both engines on the same file in one run, and so tools/ can convert
# checkpoints with llama.cpp's own converter. Neither the product nor CI depends on it.
#
#   tools/llama-cpp.sh build            fetch the llama-cpp-python sdist from PyPI (it vendors
#                                       llama.cpp), build llama-bench, llama-quantize,
#                                       llama-simple into $DS_LLAMA_DIR (default build-llama/)
#   tools/llama-cpp.sh convert HF OUT   HF checkpoint dir -> GGUF with convert_hf_to_gguf.py
#                                       (--outtype from $DS_LLAMA_OUTTYPE, default bf16)
#   tools/llama-cpp.sh quantize IN OUT TYPE   llama-quantize (Q8_0, Q4_K_M, ...)
#   tools/llama-cpp.sh python           print the converter venv's python (gguf-py importable)
#   tools/llama-cpp.sh bin NAME         print the path of a built binary (exit 1 if absent)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${DS_LLAMA_DIR:-$ROOT/build-llama}
VERSION=${DS_LLAMA_PY_VERSION:-0.3.36}
SRC=$DIR/src
JOBS=${DS_JOBS:-$(nproc)}

fetch() {
  [ -f "$SRC/CMakeLists.txt" ] && return 0
  mkdir -p "$DIR/dl"
  local tgz
  tgz=$(ls "$DIR"/dl/llama_cpp_python-*.tar.gz 2>/dev/null | head -1 || true)
  if [ -z "$tgz" ]; then
    pip download --no-deps --no-binary :all: --no-build-isolation "llama-cpp-python==$VERSION" \
      -d "$DIR/dl" >/dev/null 2>&1 ||
      pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/dl" >/dev/null
    tgz=$(ls "$DIR"/dl/llama_cpp_python-*.tar.gz | head -1)
  fi
  rm -rf "$DIR/unpack" && mkdir -p "$DIR/unpack"
  tar xzf "$tgz" -C "$DIR/unpack"
  rm -rf "$SRC"
  mv "$DIR"/unpack/llama_cpp_python-*/vendor/llama.cpp "$SRC"
  rm -rf "$DIR/unpack"
}

build() {
  fetch
  command -v cmake >/dev/null || { echo "llama-cpp.sh: cmake is needed" >&2; exit 1; }
  cmake -S "$SRC" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DGGML_OPENMP=ON >/dev/null
  cmake --build "$DIR/build" -j "$JOBS" --target llama-bench llama-quantize llama-simple \
    >"$DIR/build.log" 2>&1 || { tail -30 "$DIR/build.log" >&2; exit 1; }
  echo "llama.cpp built in $DIR/build/bin"
}

# The converter's Python dependencies, in their own venv (numpy, torch CPU, transformers...).
venv() {
  local v=$DIR/venv
  if [ ! -x "$v/bin/python" ]; then
    python3 -m venv "$v"
    "$v/bin/pip" install -q --upgrade pip
    "$v/bin/pip" install -q torch
    "$v/bin/pip" install -q numpy sentencepiece safetensors transformers "protobuf" tokenizers
  fi
  "$v/bin/pip" install -q -e "$SRC/gguf-py" >/dev/null
  echo "$v/bin/python"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  build) build ;;
  fetch) fetch ;;
  convert)
    [ $# -ge 2 ] || { echo "usage: llama-cpp.sh convert HF_DIR OUT.gguf" >&2; exit 2; }
    fetch
    py=$(venv | tail -1)
    "$py" "$SRC/convert_hf_to_gguf.py" "$1" --outfile "$2" --outtype "${DS_LLAMA_OUTTYPE:-bf16}"
    ;;
  python)
    fetch
    venv | tail -1
    ;;
  quantize)
    [ $# -ge 3 ] || { echo "usage: llama-cpp.sh quantize IN.gguf OUT.gguf TYPE" >&2; exit 2; }
    "$DIR/build/bin/llama-quantize" "$1" "$2" "$3"
    ;;
  bin)
    b="$DIR/build/bin/${1:-llama-bench}"
    [ -x "$b" ] && echo "$b" || exit 1
    ;;
  *)
    sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
    [ "$cmd" = help ] || exit 2
    ;;
esac
