// CPU attention: prefill, and queries over contiguous and paged KV caches. One templated core
// (attention.cpp) serves every variant; attention_kernels.inc registers each (op, variant) as a
// backend: `cpu` (stable) and the opt-in `cpu.<variant>` (experimental).
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "ops/args.h"

namespace decodelab::cpu {

// The strategies. Every one computes the same online softmax (f32 state, f32 accumulation).
enum class AttentionVariant {
  standard,      // cpu: few query rows per KV head (decode): split-K over the keys, merged by
                 // log-sum-exp; many rows (prefill): query tiles against f32 K/V tiles.
  streaming,     // cpu.streaming: one query row at a time, one key at a time, no split.
  row_parallel,  // cpu.rowpar: a task per (sequence, query position, KV head) for its G query
                 // heads, over the whole key range (no split-K).
  tiled,         // cpu.tiled: query rows across SIMD lanes against K/V tiles widened to f32 and
                 // sized to L1, always (decode too), no split-K.
  head_dim_64,   // cpu.d64: standard, compiled for D = 64.
  head_dim_128,  // cpu.d128: standard, compiled for D = 128.
};

void prefill_attention(const PrefillAttentionArgs& a, AttentionVariant variant);
void decode_attention(const DecodeAttentionArgs& a, AttentionVariant variant);
void decode_attention_paged(const DecodeAttentionPagedArgs& a, AttentionVariant variant);

// The head dimension a variant is compiled for; 0 = any multiple of 16 up to 256.
constexpr int64_t attention_head_dim(AttentionVariant v) {
  return v == AttentionVariant::head_dim_64 ? 64 : v == AttentionVariant::head_dim_128 ? 128 : 0;
}

// Kernel-list entries, one per (op, variant); Args is deduced from the list's function type.
template <AttentionVariant V, class Args>
void attention(const Args& a) {
  if constexpr (std::is_same_v<Args, PrefillAttentionArgs>) {
    prefill_attention(a, V);
  } else if constexpr (std::is_same_v<Args, DecodeAttentionArgs>) {
    decode_attention(a, V);
  } else {
    decode_attention_paged(a, V);
  }
}

// "" when variant V takes these arguments, else why not.
template <AttentionVariant V, class Args>
std::string attention_supports(const Args& a) {
  constexpr int64_t d = attention_head_dim(V);
  if (d != 0 && a.q.dim(3) != d) return "needs D = " + std::to_string(d) + ", got D = " + std::to_string(a.q.dim(3));
  return "";
}

}  // namespace decodelab::cpu
