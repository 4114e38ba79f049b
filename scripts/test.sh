#!/usr/bin/env bash
# Builds and runs every test: the C++ suite (with CUDA compiled when nvcc is present; CUDA tests
# skip without a GPU), the interop tests against the mlx, gguf, safetensors and mlx-lm Python
# packages, a bounded libFuzzer run over the checkpoint and product VQ codebook parsers, and the whole
# C++ suite again under AddressSanitizer and UndefinedBehaviorSanitizer, and the threaded CPU tests
# under ThreadSanitizer. The sanitizer builds compile the CPU kernels for this machine's best SIMD
# target only (the release build's tests cover every compiled target).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${DECODELAB_JOBS:-2}"

bash scripts/setup.sh --python

echo "== build (release) =="
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
echo "== C++ tests (release) =="
ctest --test-dir build -j"$jobs" --output-on-failure

echo "== interop tests: mlx, gguf, safetensors, mlx-lm =="
DECODELAB_INTEROP="$PWD/build/tests/interop/decodelab_interop" .venv/bin/python -m pytest -q tests/interop

echo "== fuzz: the checkpoint parsers (libFuzzer, 60 s), the product VQ codebook parser (10 s) =="
bash tests/fuzz/run.sh 60 10

# The sanitizer builds: -O1 and line tables only (-g1): at -O2 -g the SIMD kernel files take over
# 15 minutes each to compile under a sanitizer on two cores.
sanitizer_flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG" -DDECODELAB_CUDA=OFF
                 -DDECODELAB_SIMD=native)

echo "== build (thread sanitizer) and the threaded CPU tests =="
cmake -S . -B build-tsan -G Ninja "${sanitizer_flags[@]}" -DDECODELAB_SANITIZE=thread >/dev/null
cmake --build build-tsan -j"$jobs" --target decodelab_tests
TSAN_OPTIONS=halt_on_error=1 ctest --test-dir build-tsan -j"$jobs" --output-on-failure -R '_cpu|ThreadPool|SimdTarget'

echo "== build (address,undefined sanitizers) =="
cmake -S . -B build-sanitize -G Ninja "${sanitizer_flags[@]}" -DDECODELAB_SANITIZE=address,undefined >/dev/null
cmake --build build-sanitize -j"$jobs"
echo "== C++ tests (sanitizers) =="
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  ctest --test-dir build-sanitize -j"$jobs" --output-on-failure
