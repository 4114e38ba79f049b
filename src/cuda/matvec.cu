// CUDA decode matvecs on the CUDA cores: y[b] = W x[b] for batch 1..16 with W dense (f32, f16, bf16) or quantized
// (MLX affine 4/8-bit, GGUF Q4_0/Q8_0), and on the same kernel matvec_multi (several W over one x
// in one launch), output_projection (a residual added as y is stored) and mlp_block (gate and up
// rows of one index in one warp, SwiGLU applied as they are stored, then the down matvec).
//
// Decode is bound by reading W, so each byte of it is read once per call: a warp owns a row (one
// per weight for the MLP's gate and up) and its lanes stream the row in "units", the inputs one
// lane handles per step (16 bytes of dense or MLX codes, one 18- or 34-byte GGUF block). The loads
// of several units are issued before any is used, to keep enough bytes in flight. x is small and
// read through L1/L2. Accumulation is f32; one warp reduction per (row, input) at the end.
//
// The weight formats, and how codes become floats, are in matvec_formats.cuh.
#include <algorithm>

#include "cuda/cuda.h"
#include "cuda/matvec_formats.cuh"

namespace decodelab::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxBatch = 16;

// ------------------------------------------------------------------------------------------------
// The kernel.

// n inputs of x from p, widened to f32 (16-byte loads when they fit).
template <class TX, int kN>
__device__ __forceinline__ void load_inputs(const TX* __restrict__ p, float (&out)[kN]) {
  if constexpr (kN % kVec<TX> == 0) {
#pragma unroll
    for (int v = 0; v < kN / kVec<TX>; ++v) load_vec(p + v * kVec<TX>, reinterpret_cast<float(&)[kVec<TX>]>(out[v * kVec<TX>]));
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) out[i] = to_float(p[i]);
  }
}

// kParts = 1: a warp computes row `row` of the job that holds it. kParts = 2 (the MLP): a warp
// computes row `row` of jobs 0 (gate) and 1 (up) and stores silu(gate) * up into job 0's y.
template <class M, class TX, int kBatch, int kParts>
__global__ void __launch_bounds__(kWarps * 32) matvec_kernel(Jobs<M, TX> jobs, const TX* __restrict__ x, int64_t k,
                                                             int batch) {
  constexpr int kUnit = M::kUnit, kUnroll = M::kUnroll;
  const int lane = threadIdx.x % 32;
  int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= jobs.first_row[kParts == 2 ? 1 : jobs.count]) return;
  int job = 0;
  while (kParts == 1 && row >= jobs.first_row[job + 1]) ++job;
  row -= jobs.first_row[job];
  const int64_t units = k / kUnit;

  float acc[kParts][kBatch];
#pragma unroll
  for (int p = 0; p < kParts; ++p) {
#pragma unroll
    for (int b = 0; b < kBatch; ++b) acc[p][b] = 0.0f;
  }
  for (int64_t u0 = lane; u0 < units; u0 += 32 * kUnroll) {
    typename M::Raw raw[kParts][kUnroll];
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      if (u0 + 32 * i >= units) break;
#pragma unroll
      for (int p = 0; p < kParts; ++p) raw[p][i] = jobs.m[job + p].load(row, u0 + 32 * i);
    }
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int64_t u = u0 + 32 * i;
      if (u >= units) break;
      float w[kParts][kUnit];
#pragma unroll
      for (int p = 0; p < kParts; ++p) jobs.m[job + p].decode(raw[p][i], w[p]);
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        if (b >= batch) break;
        float xv[kUnit];
        load_inputs<TX, kUnit>(x + b * k + u * kUnit, xv);
#pragma unroll
        for (int p = 0; p < kParts; ++p) {
          float even = 0.0f, odd = 0.0f;  // two chains: half the FMA latency on the critical path
#pragma unroll
          for (int e = 0; e < kUnit; e += 2) {
            even = fmaf(w[p][e], xv[e], even);
            odd = fmaf(w[p][e + 1], xv[e + 1], odd);
          }
          acc[p][b] += even + odd;
        }
      }
    }
  }

  const int64_t n = jobs.first_row[job + 1] - jobs.first_row[job];
#pragma unroll
  for (int b = 0; b < kBatch; ++b) {
    if (b >= batch) break;
    float sum[kParts];
#pragma unroll
    for (int p = 0; p < kParts; ++p) sum[p] = group_sum<32>(acc[p][b]);
    if (lane == 0) store_output<kParts>(jobs, job, n, b, row, sum);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: the launch and the batch's compile-time bound.

template <int kBatch, int kParts, class M, class TX>
void launch(const Jobs<M, TX>& jobs, const TX* x, int64_t k, int batch, cudaStream_t s, const char* op) {
  const int64_t rows = jobs.first_row[kParts == 2 ? 1 : jobs.count];
  const unsigned blocks = unsigned((rows + kWarps - 1) / kWarps);
  matvec_kernel<M, TX, kBatch, kParts><<<blocks, kWarps * 32, 0, s>>>(jobs, x, k, batch);
  check_launch(cudaGetLastError(), op);
}

// rows of y[i] = w[i] x (+ residual[i]); kParts = 2: y[0] = silu(w[0] x) * (w[1] x).
template <int kParts, class TX>
void run_typed(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y, const Tensor* residual, Stream stream,
         const char* op) {
  dispatch_format<TX>(w[0], [&](auto make) {
    using M = decltype(make(w[0]));
    const Jobs<M, TX> jobs = make_jobs<M, TX>(make, w, y, residual, kParts == 2);
    const int batch = int(x.dim(0));
    const int64_t k = x.dim(1);
    const cudaStream_t s = stream_of(stream);
    if (batch == 1) return launch<1, kParts>(jobs, x.ptr<const TX>(), k, batch, s, op);
    if (batch <= 4) return launch<4, kParts>(jobs, x.ptr<const TX>(), k, batch, s, op);
    return launch<kMaxBatch, kParts>(jobs, x.ptr<const TX>(), k, batch, s, op);
  });
}

// The kernel family of the matvec ops (matvec_formats.cuh): any activation dtype.
struct CudaCoreMatvec {
  template <int kParts>
  static void run(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y, const Tensor* residual,
                  Stream stream, const char* op) {
    dispatch_activation(x.dtype, [&](auto tag) { run_typed<kParts, decltype(tag)>(x, w, y, residual, stream, op); });
  }
};

}  // namespace

// The stable cuda ops: cuda.codes (matvec_codes.cu) for batch-1 MLX q4 calls it takes
// (prefers_codes), the tensor-core kernel (matvec_mma.cu) where it takes the call and measured
// faster (prefers_tensor_cores), this file's kernel otherwise.
void matvec(const MatvecArgs& a) {
  if (prefers_codes(a.w, a.x) && matvec_codes_supports(a).empty()) return matvec_codes(a);
  if (prefers_tensor_cores(a.w, a.x) && matvec_mma_supports(a).empty()) return matvec_mma(a);
  run_matvec<CudaCoreMatvec>(a);
}
void matvec_multi(const MatvecMultiArgs& a) {
  if (prefers_codes(a.w[0], a.x) && matvec_multi_codes_supports(a).empty()) return matvec_multi_codes(a);
  if (prefers_tensor_cores(a.w[0], a.x) && matvec_multi_mma_supports(a).empty()) return matvec_multi_mma(a);
  run_matvec_multi<CudaCoreMatvec>(a);
}
void output_projection(const OutputProjectionArgs& a) {
  if (prefers_codes(a.wo, a.attn) && output_projection_codes_supports(a).empty()) return output_projection_codes(a);
  if (prefers_tensor_cores(a.wo, a.attn) && output_projection_mma_supports(a).empty()) return output_projection_mma(a);
  run_output_projection<CudaCoreMatvec>(a);
}
void mlp_block(const MlpBlockArgs& a) {
  if (prefers_codes(a.gate, a.x) && mlp_block_codes_supports(a).empty()) return mlp_block_codes(a);
  if (prefers_tensor_cores(a.gate, a.x) && mlp_block_mma_supports(a).empty()) return mlp_block_mma(a);
  run_mlp_block<CudaCoreMatvec>(a);
}

}  // namespace decodelab::cuda
