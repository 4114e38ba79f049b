#!/usr/bin/env bash
# Fuzzes the checkpoint parsers (safetensors header, config.json) with libFuzzer under
# AddressSanitizer and UndefinedBehaviorSanitizer for SECONDS (default 60): builds tests/fuzz with
# clang into build-fuzz/, writes the seed corpus with write_safetensors and to_json, then runs.
# Fails on any crash, leak, undefined behavior or exception other than decodelab::Error; the
# input that caused it is left in build-fuzz/ as crash-*, leak-* or timeout-*.
# Usage: tests/fuzz/run.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-60}"
jobs="${DECODELAB_JOBS:-2}"
out=build-fuzz

cmake -S tests/fuzz -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ >/dev/null
cmake --build "$out" -j"$jobs"
"$out/fuzz_make_corpus" "$out/seeds"
mkdir -p "$out/corpus"
# corpus/ keeps what earlier runs found; seeds/ is rewritten each run. -max_len: headers of real
# interest are short, and long inputs only slow the search. -timeout: seconds per input.
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  "$out/fuzz_safetensors_header" "$out/corpus" "$out/seeds" -max_total_time="$seconds" -max_len=4096 \
  -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$out/" -print_final_stats=1
