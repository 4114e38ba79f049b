// What the CUDA kernels take, in words: the supports() functions of src/cuda/kernels.inc. Kept in
// plain C++ (fmt's compile-time format checks do not build under nvcc) and in step with the
// launchers' template dispatch in attention.cu and matvec.cu.
#include <fmt/format.h>

#include "cuda/cuda.h"

namespace decodelab::cuda {
namespace {

std::string decode_supports(const Tensor& q) {
  const int64_t d = q.dim(3);
  if (q.dim(1) != 1) return fmt::format("decode only (Sq = 1), got Sq = {}", q.dim(1));
  if (d != 64 && d != 128 && (d != 256 || q.dtype == DType::f32)) {
    return fmt::format("head_dim 64, 128 or 256 (f16/bf16), got {} {}", d, dtype_name(q.dtype));
  }
  return {};
}

}  // namespace

std::string decode_attention_supports(const DecodeAttentionArgs& a) { return decode_supports(a.q); }
std::string decode_attention_paged_supports(const DecodeAttentionPagedArgs& a) { return decode_supports(a.q); }

std::string matvec_supports(const MatvecArgs& a) {
  constexpr int64_t kMaxBatch = 16;
  if (a.w.is_quantized) return "dense weights only (quantized matvec is not in the CUDA backend yet)";
  if (a.x.dim(0) > kMaxBatch) return fmt::format("batch <= {}, got {}", kMaxBatch, a.x.dim(0));
  const int64_t vec = 16 / int64_t(dtype_size(a.w.dense.dtype));
  if (a.w.cols() % vec != 0) return fmt::format("K a multiple of {} (16-byte rows), got {}", vec, a.w.cols());
  return {};
}

}  // namespace decodelab::cuda
