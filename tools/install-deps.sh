#!/usr/bin/env bash
# Installs the Debian 12 packages dsd builds, tests and demos with.
# Idempotent: when every package is present it prints nothing and exits 0.
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config
  libhwloc-dev hwloc
  ocl-icd-opencl-dev opencl-headers pocl-opencl-icd clinfo
  libzmq3-dev
  libprotobuf-c-dev protobuf-c-compiler
  libcmocka-dev
  libsystemd-dev systemd
  libjansson-dev
  libmicrohttpd-dev
  libpcre2-dev
  libglpk-dev
  iproute2
  jq
  chromium python3-venv curl
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]}" >&2
  echo "install-deps: run as root, or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
