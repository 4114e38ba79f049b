// CUDA decode matvec over dense weights: y[b] = W x[b] for batch 1..16.
//
// Memory-bound on W: each warp streams one row of W with 16-byte loads (kVec elements per lane per
// step) and applies it to every batch row of x, which is small and stays in L1/L2. Accumulation in
// f32 registers, one warp reduction per (row, batch) at the end: each W byte is read once per call.
#include "cuda/common.cuh"
#include "cuda/cuda.h"

namespace decodelab::cuda {
namespace {

constexpr int kWarps = 4;

// kBatch is a compile-time bound (so the accumulators stay in registers); batch <= kBatch rows run.
template <class TW, class TX, int kBatch>
__global__ void __launch_bounds__(kWarps * 32) matvec_kernel(const TW* __restrict__ w, const TX* __restrict__ x,
                                                             TX* __restrict__ y, int64_t n, int64_t k, int batch) {
  constexpr int kV = kVec<TW>;
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= n) return;
  const TW* w_row = w + row * k;
  float acc[kBatch];
#pragma unroll
  for (int b = 0; b < kBatch; ++b) acc[b] = 0.0f;
  // k is a multiple of kV (checked by supports()), so every 16-byte access is whole and aligned.
  for (int64_t c = int64_t(lane) * kV; c < k; c += 32 * kV) {
    float wv[kV];
    load_vec_stream(w_row + c, wv);
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (b >= batch) break;
      if constexpr (sizeof(TX) == sizeof(TW)) {
        float xv[kV];  // x rows are small and stay in L1/L2: one 16-byte load like w's
        load_vec(x + b * k + c, xv);
#pragma unroll
        for (int i = 0; i < kV; ++i) acc[b] += wv[i] * xv[i];
      } else {
#pragma unroll
        for (int i = 0; i < kV; ++i) acc[b] += wv[i] * to_float(x[b * k + c + i]);
      }
    }
  }
#pragma unroll
  for (int b = 0; b < kBatch; ++b) {
    if (b >= batch) break;
    const float sum = group_sum<32>(acc[b]);
    if (lane == 0) y[b * n + row] = from_float<TX>(sum);
  }
}

template <class TW, class TX, int kBatch>
cudaError_t launch(const MatvecArgs& a, cudaStream_t s) {
  const int64_t n = a.w.rows(), k = a.w.cols();
  const unsigned blocks = unsigned((n + kWarps - 1) / kWarps);
  matvec_kernel<TW, TX, kBatch><<<blocks, kWarps * 32, 0, s>>>(a.w.dense.ptr<const TW>(), a.x.ptr<const TX>(), a.y.ptr<TX>(), n, k,
                                                           int(a.x.dim(0)));
  return cudaGetLastError();
}

// The batch's compile-time bound: the next of 1, 2, 4, 8, 16.
template <class TW, class TX>
cudaError_t launch_for_batch(const MatvecArgs& a, cudaStream_t s) {
  switch (a.x.dim(0)) {
    case 1: return launch<TW, TX, 1>(a, s);
    case 2: return launch<TW, TX, 2>(a, s);
    case 3: case 4: return launch<TW, TX, 4>(a, s);
    case 5: case 6: case 7: case 8: return launch<TW, TX, 8>(a, s);
    default: return launch<TW, TX, 16>(a, s);
  }
}

}  // namespace

void matvec(const MatvecArgs& a) {
  dispatch_activation(a.w.dense.dtype, [&](auto w_tag) {
    dispatch_activation(a.x.dtype, [&](auto x_tag) {
      using TW = decltype(w_tag);
      using TX = decltype(x_tag);
      check_launch(launch_for_batch<TW, TX>(a, stream_of(a.stream)), "matvec");
    });
  });
}

}  // namespace decodelab::cuda
