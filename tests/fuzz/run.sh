#!/usr/bin/env bash
# Fuzzes the checkpoint parsers (safetensors header, config.json) for SECONDS (default 60), then
# the product VQ codebook parser for PVQ_SECONDS (default 10: a small binary format, the search
# saturates fast), with libFuzzer under AddressSanitizer and UndefinedBehaviorSanitizer: builds
# tests/fuzz with clang into build-fuzz/, writes the seed corpora with write_safetensors, to_json
# and save_product_vq, then runs.
# Fails on any crash, leak, undefined behavior or exception other than decodelab::Error; the
# input that caused it is left in build-fuzz/ as crash-*, leak-* or timeout-*.
# Usage: tests/fuzz/run.sh [SECONDS [PVQ_SECONDS]]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-60}"
pvq_seconds="${2:-10}"
jobs="${DECODELAB_JOBS:-2}"
out=build-fuzz

cmake -S tests/fuzz -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ >/dev/null
cmake --build "$out" -j"$jobs"
"$out/fuzz_make_corpus" "$out/seeds" "$out/seeds-product-vq"
mkdir -p "$out/corpus" "$out/corpus-product-vq"
# corpus/ keeps what earlier runs found; seeds/ is rewritten each run. -max_len: headers of real
# interest are short, and long inputs only slow the search. -timeout: seconds per input.
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  "$out/fuzz_safetensors_header" "$out/corpus" "$out/seeds" -max_total_time="$seconds" -max_len=4096 \
  -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$out/" -print_final_stats=1
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  "$out/fuzz_product_vq" "$out/corpus-product-vq" "$out/seeds-product-vq" -max_total_time="$pvq_seconds" -max_len=8192 \
  -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$out/" -print_final_stats=1
