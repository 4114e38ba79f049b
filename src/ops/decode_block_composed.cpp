// The decode block as a sequence of the best stable kernels of its device ("auto" on the CPU or on
// the GPU), with intermediates in the activation dtype on that device. Each piece is verified on
// its own; this composition is verified against the reference block as a whole. Both the cpu and
// the cuda backend list it (src/cpu/layers_kernels.inc, src/cuda/kernels.inc).
#include <cmath>
#include <cstring>

#include "core/device_memory.h"
#include "decodelab/attention.h"
#include "decodelab/layers.h"
#include "decodelab/quant.h"
#include "ops/args.h"
#include "ops/common.h"

namespace decodelab::detail {
namespace {

// src [rows, width] into columns [offset, offset + width) of dst [rows, dst_width] (same dtype and
// device), one strided copy.
void copy_columns(const Tensor& dst, int64_t offset, const Tensor& src) {
  const int64_t e = int64_t(dtype_size(src.dtype)), rows = src.dim(0), width = src.dim(1);
  char* to = static_cast<char*>(dst.data) + offset * e;
  const size_t pitch = size_t(dst.dim(dst.rank - 1) * e), row_bytes = size_t(width * e);
  if (src.device == Device::cuda) {
    device_copy_2d(to, pitch, src.data, row_bytes, row_bytes, size_t(rows));
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(to + size_t(r) * pitch, static_cast<const char*>(src.data) + size_t(r) * row_bytes, row_bytes);
  }
}

}  // namespace

void composed_decode_block(const DecodeBlockArgs& a) {
  const DecodeLayerConfig& c = a.config;
  const DecodeLayerWeights& w = a.weights;
  const RunOptions run{"auto", a.stream};
  const DType t = a.x.dtype;
  const Device device = a.x.device;
  const int64_t batch = a.x.dim(0);
  const int64_t q_width = c.num_heads * c.head_dim, kv_width = c.num_kv_heads * c.head_dim;

  Array normed(t, {batch, c.hidden}, device);
  rms_norm(a.x, w.attn_norm, c.rms_eps, normed, run);
  Array q_flat(t, {batch, q_width}, device), k_flat(t, {batch, kv_width}, device), v_flat(t, {batch, kv_width}, device);
  qkv_projection(normed, w.wq, w.wk, w.wv, q_flat, k_flat, v_flat, run);
  // Side by side per sequence, as the fused split/RoPE/append reads them.
  Array qkv(t, {batch, 1, q_width + 2 * kv_width}, device);
  copy_columns(qkv, 0, q_flat);
  copy_columns(qkv, q_width, k_flat);
  copy_columns(qkv, q_width + kv_width, v_flat);
  Array q(t, {batch, 1, c.num_heads, c.head_dim}, device);
  qkv_rope_append_paged(qkv, c.rope, a.cache, q, run);

  // Attention covers the new token too: the caller advances the lengths afterwards.
  const std::vector<int32_t> lengths = read_i32(a.cache.lengths);
  Array with_new_host(DType::i32, {batch});
  for (int64_t b = 0; b < batch; ++b) with_new_host.ptr<int32_t>()[b] = lengths[size_t(b)] + 1;
  const Array with_new = with_new_host.to(device);
  PagedKV with_new_token = a.cache;
  with_new_token.lengths = with_new;
  Array attn(t, {batch, 1, c.num_heads, c.head_dim}, device);
  decode_attention_paged(q, with_new_token, attn, {true, float(1.0 / std::sqrt(double(c.head_dim)))}, run);

  Array h(t, {batch, c.hidden}, device);
  output_projection(Tensor::contiguous(attn.data(), t, {batch, q_width}, device), w.wo, a.x, h, run);
  rms_norm(h, w.mlp_norm, c.rms_eps, normed, run);
  Array mlp_out(t, {batch, c.hidden}, device);
  mlp_block(normed, w.gate, w.up, w.down, mlp_out, run);
  residual_add(h, mlp_out, a.out, run);
}

}  // namespace decodelab::detail
