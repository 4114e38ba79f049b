// CPU decode block: the layer as a sequence of the best stable CPU kernels ("auto" on the CPU),
// with intermediates in the activation dtype. Each piece is verified on its own; this composition
// is verified against the reference block as a whole.
#include <cmath>
#include <cstring>

#include "cpu/cpu.h"
#include "decodelab/attention.h"
#include "decodelab/layers.h"
#include "decodelab/quant.h"

namespace decodelab::cpu {

void decode_block(const DecodeBlockArgs& a) {
  const DecodeLayerConfig& c = a.config;
  const DecodeLayerWeights& w = a.weights;
  const RunOptions run{"auto", a.stream};
  const DType t = a.x.dtype;
  const int64_t batch = a.x.dim(0), e = int64_t(dtype_size(t));
  const int64_t q_width = c.num_heads * c.head_dim, kv_width = c.num_kv_heads * c.head_dim;

  Array normed(t, {batch, c.hidden});
  rms_norm(a.x, w.attn_norm, c.rms_eps, normed, run);
  Array q_flat(t, {batch, q_width}), k_flat(t, {batch, kv_width}), v_flat(t, {batch, kv_width});
  qkv_projection(normed, w.wq, w.wk, w.wv, q_flat, k_flat, v_flat, run);
  // Side by side per sequence, as the fused split/RoPE/append reads them.
  Array qkv(t, {batch, 1, q_width + 2 * kv_width});
  for (int64_t b = 0; b < batch; ++b) {
    char* row = static_cast<char*>(qkv.data()) + b * (q_width + 2 * kv_width) * e;
    std::memcpy(row, q_flat.ptr<char>() + b * q_width * e, size_t(q_width * e));
    std::memcpy(row + q_width * e, k_flat.ptr<char>() + b * kv_width * e, size_t(kv_width * e));
    std::memcpy(row + (q_width + kv_width) * e, v_flat.ptr<char>() + b * kv_width * e, size_t(kv_width * e));
  }
  Array q(t, {batch, 1, c.num_heads, c.head_dim});
  qkv_rope_append_paged(qkv, c.rope, a.cache, q, run);

  // Attention covers the new token too: the caller advances the lengths afterwards.
  Array lengths(DType::i32, {batch});
  for (int64_t b = 0; b < batch; ++b) lengths.ptr<int32_t>()[b] = a.cache.lengths.ptr<const int32_t>()[b] + 1;
  PagedKV with_new_token = a.cache;
  with_new_token.lengths = lengths;
  Array attn(t, {batch, 1, c.num_heads, c.head_dim});
  decode_attention_paged(q, with_new_token, attn, {true, float(1.0 / std::sqrt(double(c.head_dim)))}, run);

  Array h(t, {batch, c.hidden});
  output_projection(Tensor::contiguous(attn.data(), t, {batch, q_width}), w.wo, a.x, h, run);
  rms_norm(h, w.mlp_norm, c.rms_eps, normed, run);
  Array mlp_out(t, {batch, c.hidden});
  mlp_block(normed, w.gate, w.up, w.down, mlp_out, run);
  residual_add(h, mlp_out, a.out, run);
}

}  // namespace decodelab::cpu
