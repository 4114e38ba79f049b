#!/usr/bin/env bash
# Installs what decodelab needs to build and test, from Debian packages (and, with --python, the
# Python packages of the interop tests into .venv from PyPI). Safe to run again: it only installs
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# clang and libclang-rt-14-dev (libFuzzer) build the fuzz target of tests/fuzz.
packages=(cmake ninja-build g++ libgtest-dev libhwy-dev nlohmann-json3-dev libcli11-dev libfmt-dev python3-venv
          clang libclang-rt-14-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "${1:-}" = "--python" ]; then
  # mlx needs its CPU backend package on Linux (mlx[cpu]); gguf is ggml's own Python package;
  # safetensors is Hugging Face's reference reader and writer; mlx-lm holds the independent Llama.
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "mlx[cpu]" gguf numpy pytest safetensors mlx-lm
fi
