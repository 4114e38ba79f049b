#!/usr/bin/env bash
# The GPU check, in one run on the H100 machine: build, the CUDA tests, the CUDA verification grid,
# compute-sanitizer (memcheck and racecheck) over the CUDA tests, and the CUDA benchmark where the
# build has one. Usage: tools/gpu-check.sh OUT_DIR   (logs land in OUT_DIR; exit status 1 on any failure)
#
# That machine has CUDA, CMake, Ninja and g++ but no package registry: the Debian packages it lacks
# (Highway, fmt, CLI11, nlohmann-json, GoogleTest) travel as .deb files in .deps/ (fetch them here
# with `mkdir -p .deps && cd .deps && apt-get download libhwy-dev libhwy1 libfmt-dev libfmt9
# libcli11-dev nlohmann-json3-dev libgtest-dev`) and are unpacked into a private prefix.
set -uo pipefail
out="${1:?usage: tools/gpu-check.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
status=0
step() {  # step NAME COMMAND...: runs it, logs to OUT_DIR/NAME.log, records failure
  local name="$1"; shift
  echo "== $name: $*"
  if ! "$@" >"$out/$name.log" 2>&1; then echo "   FAILED (see $name.log)"; status=1; fi
  tail -n 4 "$out/$name.log"
}

deps=/tmp/decodelab-deps
if [ -d .deps ]; then
  for f in .deps/*.deb; do dpkg -x "$f" "$deps"; done
  export CMAKE_PREFIX_PATH="$deps/usr"
  export LD_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1

step build bash -c "cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DDECODELAB_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90a && cmake --build build-gpu -j\$(nproc) --target decodelab_cuda_tests decodelab_cli"
[ -x build-gpu/tests/decodelab_cuda_tests ] || { echo "build failed"; exit 1; }
step cuda-tests build-gpu/tests/decodelab_cuda_tests
step verify-cuda build-gpu/tools/decodelab/decodelab verify --device cuda --no-trust
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 build-gpu/tests/decodelab_cuda_tests
step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 build-gpu/tests/decodelab_cuda_tests \
  --gtest_filter='All/CudaGrid*'
# BENCH_OPS="op1 op2" limits the benchmark to those ops (default: the whole grid).
if [ -n "${BENCH_OPS:-}" ]; then
  for op in $BENCH_OPS; do
    step "bench-$op" build-gpu/tools/decodelab/decodelab bench --device cuda --op "$op" --json "$out/bench-$op.json"
  done
else
  step bench-cuda build-gpu/tools/decodelab/decodelab bench --device cuda --json "$out/bench-cuda.json"
fi
exit $status
