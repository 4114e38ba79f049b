// The decode block as a sequence of the best stable kernels of its device ("auto" on the CPU or on
// the GPU, or the caller's per-op choices), with intermediates in the activation dtype on that device. Each piece is verified on
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
// device), one strided copy (in stream order on the GPU).
void copy_columns(const Tensor& dst, int64_t offset, const Tensor& src, Stream stream) {
  const int64_t e = int64_t(dtype_size(src.dtype)), rows = src.dim(0), width = src.dim(1);
  char* to = static_cast<char*>(dst.data) + offset * e;
  const size_t pitch = size_t(dst.dim(dst.rank - 1) * e), row_bytes = size_t(width * e);
  if (src.device == Device::cuda) {
    device_copy_2d(to, pitch, src.data, row_bytes, row_bytes, size_t(rows), stream.handle);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(to + size_t(r) * pitch, static_cast<const char*>(src.data) + size_t(r) * row_bytes, row_bytes);
  }
}

}  // namespace

// Nothing in here waits for the device: the intermediates come from one scratch allocation in
// stream order, the lengths that include the new token are computed where the lengths live, and
// the pieces skip the index checks that decode_block already made (RunOptions::check_indices), so
// a GPU step does not stop at every layer.
void composed_decode_block(const DecodeBlockArgs& a) {
  const DecodeLayerConfig& c = a.config;
  const DecodeLayerWeights& w = a.weights;
  RunOptions run{"auto", a.stream};
  run.check_indices = false;
  run.per_op = a.per_op;
  const DType t = a.x.dtype;
  const Device device = a.x.device;
  const int64_t batch = a.x.dim(0), e = int64_t(dtype_size(t));
  const int64_t q_width = c.num_heads * c.head_dim, kv_width = c.num_kv_heads * c.head_dim;
  const int64_t qkv_width = q_width + 2 * kv_width;

  const size_t row = size_t(batch * e);
  ScratchBuffer scratch(device == Device::cuda,
                        ScratchBuffer::bytes_for({row * size_t(c.hidden), row * size_t(q_width), row * size_t(kv_width),
                                                  row * size_t(kv_width), row * size_t(qkv_width), row * size_t(q_width),
                                                  row * size_t(q_width), row * size_t(c.hidden), row * size_t(c.hidden),
                                                  size_t(batch) * sizeof(int32_t)}),
                        a.stream.handle);
  const auto take = [&](std::initializer_list<int64_t> shape) {
    int64_t n = 1;
    for (const int64_t d : shape) n *= d;
    return Tensor::contiguous(scratch.take(size_t(n * e)), t, shape, device);
  };

  const Tensor normed = take({batch, c.hidden});
  rms_norm(a.x, w.attn_norm, c.rms_eps, normed, run);
  // Q, K and V side by side per sequence, as the fused split/RoPE/append reads them. With one
  // sequence, each projection's output is a contiguous slice of that row and is written in place;
  // with more, they are gathered by three strided copies.
  const Tensor qkv = take({batch, 1, qkv_width});
  const bool in_place = batch == 1;
  const auto output = [&](int64_t offset, int64_t width) {
    return in_place ? Tensor::contiguous(static_cast<char*>(qkv.data) + offset * e, t, {1, width}, device)
                    : take({batch, width});
  };
  const Tensor q_flat = output(0, q_width), k_flat = output(q_width, kv_width),
               v_flat = output(q_width + kv_width, kv_width);
  qkv_projection(normed, w.wq, w.wk, w.wv, q_flat, k_flat, v_flat, run);
  // Qwen2's biases, in place before the columns are gathered.
  for (const auto& [flat, bias] : {std::pair{&q_flat, &w.bq}, std::pair{&k_flat, &w.bk}, std::pair{&v_flat, &w.bv}}) {
    if (has_bias(*bias)) bias_add(*flat, *bias, *flat, run);
  }
  if (!in_place) {
    copy_columns(qkv, 0, q_flat, a.stream);
    copy_columns(qkv, q_width, k_flat, a.stream);
    copy_columns(qkv, q_width + kv_width, v_flat, a.stream);
  }
  const Tensor q = take({batch, 1, c.num_heads, c.head_dim});
  qkv_rope_append_paged(qkv, c.rope, a.cache, q, run);

  // Attention covers the new token too: the caller advances the lengths afterwards.
  PagedKV with_new_token = a.cache;
  with_new_token.lengths =
      Tensor::contiguous(scratch.take(size_t(batch) * sizeof(int32_t)), DType::i32, {batch}, device);
  if (device == Device::cuda) {
    device_add_i32(with_new_token.lengths.ptr<int32_t>(), a.cache.lengths.ptr<const int32_t>(), batch, 1, a.stream.handle);
  } else {
    for (int64_t b = 0; b < batch; ++b) {
      with_new_token.lengths.ptr<int32_t>()[b] = a.cache.lengths.ptr<const int32_t>()[b] + 1;
    }
  }
  const Tensor attn = take({batch, 1, c.num_heads, c.head_dim});
  decode_attention_paged(q, with_new_token, attn, {true, float(1.0 / std::sqrt(double(c.head_dim)))}, run);

  const Tensor h = take({batch, c.hidden});
  output_projection(Tensor::contiguous(attn.data, t, {batch, q_width}, device), w.wo, a.x, h, run);
  rms_norm(h, w.mlp_norm, c.rms_eps, normed, run);
  const Tensor mlp_out = take({batch, c.hidden});
  mlp_block(normed, w.gate, w.up, w.down, mlp_out, run);
  residual_add(h, mlp_out, a.out, run);
}

}  // namespace decodelab::detail
