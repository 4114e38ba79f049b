// The decode block as a sequence of the best stable kernels of its device ("auto" on the CPU or on
// the GPU, or the caller's per-op choices), with intermediates in the activation dtype on that device. Each piece is verified on
// its own; this composition is verified against the reference block as a whole. Both the cpu and
// the cuda backend list it (src/cpu/layers_kernels.inc, src/cuda/kernels.inc). The same pieces
// around TurboQuant's append and attention make decode_block_turboquant (model.h), on any backend.
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

// The parts of a decode step that do not depend on the cache's format: the normed q/k/v
// projections before the cache ops, and the output projection, residual and MLP after them. The
// f16 block and the TurboQuant block differ only in between (how K and V reach the cache and how
// attention reads it), so both are built from one of these.
//
// Nothing in here waits for the device: the intermediates come from one scratch allocation in
// stream order and the lengths that include the new token are computed where the lengths live.
class DecodeStep {
 public:
  // extra_elements: the sizes (in elements of x's dtype) of the caller's own intermediates, taken
  // with take() after the shared ones.
  DecodeStep(const Tensor& x, const DecodeLayerWeights& weights, const DecodeLayerConfig& config, RunOptions run,
             std::initializer_list<int64_t> extra_elements)
      : x_(x), w_(weights), c_(config), run_(run), batch_(x.dim(0)), e_(int64_t(dtype_size(x.dtype))),
        q_width_(config.num_heads * config.head_dim), kv_width_(config.num_kv_heads * config.head_dim),
        scratch_(x.device == Device::cuda, scratch_bytes(extra_elements), run.stream.handle) {}

  const RunOptions& run() const { return run_; }

  // Room for `shape` in x's dtype on x's device.
  Tensor take(std::initializer_list<int64_t> shape) {
    int64_t n = 1;
    for (const int64_t d : shape) n *= d;
    return Tensor::contiguous(scratch_.take(size_t(n * e_)), x_.dtype, shape, x_.device);
  }

  // rms_norm(x), then the q/k/v projections (+ biases): Q, K and V side by side per sequence,
  // [B, 1, (Hq + 2 Hkv) D], as the split/RoPE ops read them. With one sequence, each projection's
  // output is a contiguous slice of that row and is written in place; with more, they are gathered
  // by three strided copies.
  Tensor project_qkv() {
    normed_ = take({batch_, c_.hidden});
    rms_norm(x_, w_.attn_norm, c_.rms_eps, normed_, run_);
    const Tensor qkv = take({batch_, 1, q_width_ + 2 * kv_width_});
    const bool in_place = batch_ == 1;
    const auto output = [&](int64_t offset, int64_t width) {
      return in_place ? Tensor::contiguous(static_cast<char*>(qkv.data) + offset * e_, x_.dtype, {1, width}, x_.device)
                      : take({batch_, width});
    };
    const Tensor q_flat = output(0, q_width_), k_flat = output(q_width_, kv_width_),
                 v_flat = output(q_width_ + kv_width_, kv_width_);
    qkv_projection(normed_, w_.wq, w_.wk, w_.wv, q_flat, k_flat, v_flat, run_);
    // Qwen2's biases, in place before the columns are gathered.
    for (const auto& [flat, bias] : {std::pair{&q_flat, &w_.bq}, std::pair{&k_flat, &w_.bk}, std::pair{&v_flat, &w_.bv}}) {
      if (has_bias(*bias)) bias_add(*flat, *bias, *flat, run_);
    }
    if (!in_place) {
      copy_columns(qkv, 0, q_flat, run_.stream);
      copy_columns(qkv, q_width_, k_flat, run_.stream);
      copy_columns(qkv, q_width_ + kv_width_, v_flat, run_.stream);
    }
    return qkv;
  }

  // lengths + 1: attention covers the new token too (the caller advances the lengths afterwards).
  Tensor lengths_with_new_token(const Tensor& lengths) {
    const Tensor plus_one =
        Tensor::contiguous(scratch_.take(size_t(batch_) * sizeof(int32_t)), DType::i32, {batch_}, x_.device);
    if (x_.device == Device::cuda) {
      device_add_i32(plus_one.ptr<int32_t>(), lengths.ptr<const int32_t>(), batch_, 1, run_.stream.handle);
    } else {
      for (int64_t b = 0; b < batch_; ++b) plus_one.ptr<int32_t>()[b] = lengths.ptr<const int32_t>()[b] + 1;
    }
    return plus_one;
  }

  // out = h + mlp(rms_norm(h)), h = x + Wo attn; attn: [B, Hq, D] (any shape of that size).
  void finish(const Tensor& attn, const Tensor& out) {
    const Tensor h = take({batch_, c_.hidden});
    output_projection(Tensor::contiguous(attn.data, x_.dtype, {batch_, q_width_}, x_.device), w_.wo, x_, h, run_);
    rms_norm(h, w_.mlp_norm, c_.rms_eps, normed_, run_);
    const Tensor mlp_out = take({batch_, c_.hidden});
    mlp_block(normed_, w_.gate, w_.up, w_.down, mlp_out, run_);
    residual_add(h, mlp_out, out, run_);
  }

 private:
  size_t scratch_bytes(std::initializer_list<int64_t> extra_elements) const {
    const size_t row = size_t(batch_ * e_);
    // normed, qkv, q/k/v before gathering, h, mlp_out, the lengths + 1.
    size_t bytes = ScratchBuffer::bytes_for({row * size_t(c_.hidden), row * size_t(q_width_ + 2 * kv_width_),
                                             row * size_t(q_width_), row * size_t(kv_width_), row * size_t(kv_width_),
                                             row * size_t(c_.hidden), row * size_t(c_.hidden),
                                             size_t(batch_) * sizeof(int32_t)});
    for (const int64_t n : extra_elements) bytes += ScratchBuffer::bytes_for({size_t(n * e_)});
    return bytes;
  }

  const Tensor& x_;
  const DecodeLayerWeights& w_;
  const DecodeLayerConfig& c_;
  RunOptions run_;
  int64_t batch_, e_, q_width_, kv_width_;
  ScratchBuffer scratch_;
  Tensor normed_;
};

}  // namespace

// The pieces run on "auto" of the block's device: this is the cpu and cuda backends' block.
void composed_decode_block(const DecodeBlockArgs& a) {
  const DecodeLayerConfig& c = a.config;
  const int64_t batch = a.x.dim(0), q_elements = batch * c.num_heads * c.head_dim;
  // decode_block checked the page table and lengths: the pieces skip that (RunOptions::check_indices),
  // so a GPU step does not stop at every layer to read them back.
  RunOptions run{"auto", a.stream};
  run.check_indices = false;
  run.per_op = a.per_op;
  DecodeStep step(a.x, a.weights, c, run, {q_elements, q_elements});
  const Tensor qkv = step.project_qkv();
  const Tensor q = step.take({batch, 1, c.num_heads, c.head_dim});
  qkv_rope_append_paged(qkv, c.rope, a.cache, q, step.run());
  PagedKV with_new_token = a.cache;
  with_new_token.lengths = step.lengths_with_new_token(a.cache.lengths);
  const Tensor attn = step.take({batch, 1, c.num_heads, c.head_dim});
  decode_attention_paged(q, with_new_token, attn, {true, float(1.0 / std::sqrt(double(c.head_dim)))}, step.run());
  step.finish(attn, a.out);
}

// The pieces run on the caller's backend and options: there is no fused TurboQuant block, so
// "reference" composes reference ops and "cpu" or "cuda" their own, and the append and the
// attention check the page table and lengths when run.check_indices asks.
void composed_decode_block_turboquant(const Tensor& x, const DecodeLayerWeights& weights, const DecodeLayerConfig& c,
                                      const PagedTurboQuantKV& cache, const Tensor& out, const RunOptions& run) {
  const int64_t batch = x.dim(0), q_elements = batch * c.num_heads * c.head_dim,
                kv_elements = batch * c.num_kv_heads * c.head_dim;
  DecodeStep step(x, weights, c, run, {q_elements, kv_elements, kv_elements, q_elements});
  const Tensor qkv = step.project_qkv();
  // RoPE at each new token's position, lengths[b]; K and V go to the encoder, not to an f16 cache.
  const Tensor q = step.take({batch, c.num_heads, c.head_dim});
  const Tensor k = step.take({batch, c.num_kv_heads, c.head_dim});
  const Tensor v = step.take({batch, c.num_kv_heads, c.head_dim});
  const auto one_token = [&](const Tensor& t) {
    return Tensor::contiguous(t.data, t.dtype, {batch, 1, t.dim(1), t.dim(2)}, t.device);
  };
  qkv_split_rope(qkv, cache.lengths, c.rope, one_token(q), one_token(k), one_token(v), step.run());
  turboquant_append_paged(k, v, cache, step.run());
  PagedTurboQuantKV with_new_token = cache;
  with_new_token.lengths = step.lengths_with_new_token(cache.lengths);
  const Tensor attn = step.take({batch, c.num_heads, c.head_dim});
  turboquant_decode_attention_paged(q, with_new_token, attn, {true, float(1.0 / std::sqrt(double(c.head_dim)))},
                                    step.run());
  step.finish(attn, out);
}

}  // namespace decodelab::detail
