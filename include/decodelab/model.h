// One Llama-family decoder layer for a decode step (the multi-layer stack comes on top of it).
#pragma once

#include "decodelab/attention.h"
#include "decodelab/kv_cache.h"
#include "decodelab/layers.h"
#include "decodelab/quant.h"

namespace decodelab {

struct DecodeLayerConfig {
  int64_t hidden = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate = 0;
  float rms_eps = 1e-5f;
  RopeParams rope{};
};

struct DecodeLayerWeights {
  Tensor attn_norm;  // [hidden]
  Tensor mlp_norm;   // [hidden]
  Weight wq, wk, wv, wo;
  Weight gate, up, down;
};

// One decode step of one layer for B sequences, one new token each (x, out = [B, hidden]):
//   h = x + Wo attention(rope(Wq n), cache + rope(Wk n), Wv n),  n = rms_norm(x)
//   out = h + mlp(rms_norm(h))
// The new token's K and V are written at lengths[b] (its position) and attention covers
// lengths[b] + 1 tokens; the caller advances the lengths afterwards. out may alias x.
void decode_block(const Tensor& x, const DecodeLayerWeights& weights,
                  const DecodeLayerConfig& config, const PagedKV& cache, const Tensor& out,
                  const RunOptions& run = {});

}  // namespace decodelab
