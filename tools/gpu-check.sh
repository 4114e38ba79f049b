#!/usr/bin/env bash
# The GPU check, in one run on the H100 machine: build, the CUDA tests, the CUDA benchmark, and
# compute-sanitizer (memcheck and racecheck) over the CUDA tests. Usage: tools/gpu-check.sh OUT_DIR
# (logs and JSON land in OUT_DIR; exit status 1 on any failure). The steps run in that order, so a
# run cut short by its time limit still leaves the tests' and the benchmark's logs.
#
# That machine has CUDA, CMake, Ninja and g++ but no package registry: the Debian packages it lacks
# (Highway, fmt, CLI11, nlohmann-json, GoogleTest) travel as .deb files in .deps/ (fetch them here
# with `mkdir -p .deps && cd .deps && apt-get download libhwy-dev libhwy1 libfmt-dev libfmt9
# libcli11-dev nlohmann-json3-dev libgtest-dev`) and are unpacked into a private prefix.
#
# Knobs (environment):
#   GPU_BIN=DIR        use decodelab and decodelab_cuda_tests built elsewhere (same CUDA major
#                      version, Debian 12 libraries from .deps) instead of building here
#   BENCH_OPS="a b:T"  benchmark only these ops (default: the whole grid); "op:TEXT" only the cases
#                      of op whose shape contains TEXT (no spaces, e.g. matvec:K=14336)
#   SANITIZE_FILTER=F  gtest filter for the compute-sanitizer runs (default: every CUDA test)
#   SANITIZE=0         skip the compute-sanitizer runs
#   GENERATE="A;B"     after the benchmark, `decodelab generate --device cuda` once per
#                      ;-separated argument list, e.g. "--synthetic llama3-8b --dtype f16
#                      --quantize mlx.q4.g64 --context 1024" (logs generate-1.log, ...)
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

if [ -n "${GPU_BIN:-}" ]; then
  bin="$GPU_BIN"
else
  # One SIMD target (this machine's): the CPU kernels are not what this run checks.
  step build bash -c "cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DDECODELAB_CUDA=ON \
    -DDECODELAB_SIMD=native -DCMAKE_CUDA_ARCHITECTURES=90a && \
    cmake --build build-gpu -j\$(nproc) --target decodelab_cuda_tests decodelab_cli"
  mkdir -p build-gpu/bin
  cp build-gpu/tests/decodelab_cuda_tests build-gpu/tools/decodelab/decodelab build-gpu/bin/ 2>/dev/null
  bin=build-gpu/bin
fi
[ -x "$bin/decodelab_cuda_tests" ] && [ -x "$bin/decodelab" ] || { echo "no binaries in $bin"; exit 1; }
export XDG_CACHE_HOME="$out/cache"

step cuda-tests "$bin/decodelab_cuda_tests"
if [ -n "${BENCH_OPS:-}" ]; then
  n=0
  for spec in $BENCH_OPS; do  # numbered logs: two entries of one op must not overwrite each other
    n=$((n + 1)) op="${spec%%:*}" shape=""
    [ "$op" != "$spec" ] && shape="${spec#*:}"
    step "bench-$n-$op" "$bin/decodelab" bench --device cuda --op "$op" --shape "$shape" --json "$out/bench-$n-$op.json"
  done
else
  step bench-cuda "$bin/decodelab" bench --device cuda --json "$out/bench-cuda.json"
fi
if [ -n "${GENERATE:-}" ]; then
  IFS=';' read -ra runs <<<"$GENERATE"
  for i in "${!runs[@]}"; do
    read -ra args <<<"${runs[$i]}"
    step "generate-$((i + 1))" "$bin/decodelab" generate --device cuda "${args[@]}"
  done
fi
[ "${SANITIZE:-1}" = 0 ] && exit $status
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$bin/decodelab_cuda_tests" \
  --gtest_filter="${SANITIZE_FILTER:-*}"
step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 "$bin/decodelab_cuda_tests" \
  --gtest_filter="${SANITIZE_FILTER:-All/CudaGrid*}"
exit $status
