// Reference decode block: the composition of the reference ops, with every intermediate stored in
// the output's dtype as a backend would store it between kernels.
#include <cmath>

#include "reference/elements.h"
#include "reference/reference.h"

namespace decodelab::reference {

void decode_block(const DecodeBlockArgs& a) {
  const DecodeLayerConfig& c = a.config;
  const DecodeLayerWeights& w = a.weights;
  const DType t = a.out.dtype;
  const int64_t batch = a.x.dim(0);
  const int64_t q_width = c.num_heads * c.head_dim, kv_width = c.num_kv_heads * c.head_dim;
  const int64_t qkv_width = q_width + 2 * kv_width;

  Array normed(t, {batch, c.hidden});
  rms_norm({a.x, w.attn_norm, normed, c.rms_eps, a.stream});

  // Q, K and V projections, laid side by side as the fused split/RoPE/append expects them.
  Array q_flat(t, {batch, q_width}), k_flat(t, {batch, kv_width}), v_flat(t, {batch, kv_width});
  matvec_multi({normed, 3, {w.wq, w.wk, w.wv}, {q_flat.view(), k_flat.view(), v_flat.view()}, a.stream});
  // Qwen2's biases, added to the projections as stored (a second rounding, as between kernels).
  for (const auto& [flat, bias] : {std::pair{&q_flat, &w.bq}, std::pair{&k_flat, &w.bk}, std::pair{&v_flat, &w.bv}}) {
    if (has_bias(*bias)) bias_add({*flat, *bias, *flat, a.stream});
  }
  Array qkv(t, {batch, 1, qkv_width});
  for (int64_t b = 0; b < batch; ++b) {
    int64_t column = b * qkv_width;
    for (const Array* piece : {&q_flat, &k_flat, &v_flat}) {
      const int64_t width = piece->view().dim(1);
      for (int64_t i = 0; i < width; ++i) store(qkv, column + i, load(*piece, b * width + i));
      column += width;
    }
  }

  Array q(t, {batch, 1, c.num_heads, c.head_dim});
  qkv_rope_append_paged({qkv, q, a.cache, c.rope, a.stream});

  // Attention covers the new token too.
  Array lengths(DType::i32, {batch});
  for (int64_t b = 0; b < batch; ++b) lengths.ptr<int32_t>()[b] = int32_t(load_index(a.cache.lengths, b) + 1);
  PagedKV with_new_token = a.cache;
  with_new_token.lengths = lengths;
  AttentionOptions options;
  options.scale = float(1.0 / std::sqrt(double(c.head_dim)));
  Array attn(t, {batch, 1, c.num_heads, c.head_dim});
  decode_attention_paged({q, with_new_token, attn, options, a.stream});

  Array h(t, {batch, c.hidden});
  output_projection({Tensor::contiguous(attn.data(), t, {batch, q_width}), w.wo, a.x, h, a.stream});
  rms_norm({h, w.mlp_norm, normed, c.rms_eps, a.stream});
  Array mlp_out(t, {batch, c.hidden});
  mlp_block({normed, w.gate, w.up, w.down, mlp_out, a.stream});
  residual_add({h, mlp_out, a.out, a.stream});
}

}  // namespace decodelab::reference
