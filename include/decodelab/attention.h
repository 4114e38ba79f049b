// Attention for decoding: prefill over Q/K/V tensors, and attention of new queries over a
// contiguous or paged KV cache (decode is one query per sequence).
//
// Layouts: Q, K, V, out = [B, S, H, D]; caches as in kv_cache.h. GQA/MQA: Hq = G * Hkv and query
// head h reads KV head h / G. D is a multiple of 16 up to 256. With causal masking the last
// query lines up with the last key: query i of Sq sees keys j <= i + (Skv - Sq).
#pragma once

#include "decodelab/kv_cache.h"
#include "decodelab/router.h"
#include "decodelab/tensor.h"

namespace decodelab {

struct AttentionOptions {
  bool causal = true;
  float scale = 0.0f;  // 0 = 1/sqrt(D)
};

// q = [B, Sq, Hq, D], k, v = [B, Skv, Hkv, D], out = [B, Sq, Hq, D]. Causal needs Sq <= Skv.
void prefill_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                       const AttentionOptions& options = {}, const RunOptions& run = {});

// q = [B, Sq, Hq, D] (Sq = 1 for decode; Sq > 1 is chunked prefill over the cache, whose
// lengths already include the chunk), out = [B, Sq, Hq, D]. Every length must be >= Sq.
void decode_attention(const Tensor& q, const ContiguousKV& cache, const Tensor& out,
                      const AttentionOptions& options = {}, const RunOptions& run = {});
void decode_attention_paged(const Tensor& q, const PagedKV& cache, const Tensor& out,
                            const AttentionOptions& options = {}, const RunOptions& run = {});

}  // namespace decodelab
