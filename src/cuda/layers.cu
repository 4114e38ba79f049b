// CUDA RMSNorm, RMSNorm + residual, residual add, bias add and SwiGLU. One pass over the
// activations: a block per row for the norms (its sum of squares reduced in shared memory), a
// grid-stride loop for the elementwise ops; f32 arithmetic, 16-byte accesses where the row allows.
#include "cuda/common.cuh"
#include "cuda/cuda.h"

namespace decodelab::cuda {
namespace {

constexpr int kThreads = 256;

__device__ float block_sum(float v) {
  __shared__ float partial[kThreads / 32];
  v = group_sum<32>(v);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += partial[w];  // same order in every thread
  __syncthreads();
  return total;
}

// out = norm(x) * w for one row per block; with `residual`, the row is first residual += x (stored,
// rounded to T) and the stored sum is normalized, as the reference defines it. A thread keeps its
// first kKept elements and their weights in registers, all loaded before any is used, so a row of
// up to kThreads * kKept elements is read once, in one round trip to memory (the decode step's
// norms are one row: their time is latency, 4.4 us on the H200 with a second pass over the row);
// longer rows read the rest twice.
template <class T, bool kResidual>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(const T* __restrict__ x, T* __restrict__ residual,
                                                            const T* __restrict__ w, T* __restrict__ out,
                                                            int64_t hidden, float eps) {
  constexpr int kKept = 32;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* hr = kResidual ? residual + row * hidden : nullptr;
  T* yr = out + row * hidden;
  const auto input = [&](int64_t i) {
    float v = to_float(xr[i]);
    if constexpr (kResidual) {
      const T stored = from_float<T>(v + to_float(hr[i]));
      hr[i] = stored;
      v = to_float(stored);
    }
    return v;
  };
  float kept[kKept];
  T kept_w[kKept];
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kKept; ++j) {
    const int64_t i = int64_t(j) * kThreads + threadIdx.x;
    kept[j] = i < hidden ? input(i) : 0.0f;
    kept_w[j] = i < hidden ? w[i] : T{};
    sum += kept[j] * kept[j];
  }
  for (int64_t i = int64_t(kKept) * kThreads + threadIdx.x; i < hidden; i += kThreads) {
    const float v = input(i);
    sum += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum) / float(hidden) + eps);
#pragma unroll
  for (int j = 0; j < kKept; ++j) {
    const int64_t i = int64_t(j) * kThreads + threadIdx.x;
    if (i < hidden) yr[i] = from_float<T>(kept[j] * inv_rms * to_float(kept_w[j]));
  }
  const T* src = kResidual ? hr : xr;
  for (int64_t i = int64_t(kKept) * kThreads + threadIdx.x; i < hidden; i += kThreads) {
    yr[i] = from_float<T>(to_float(src[i]) * inv_rms * to_float(w[i]));
  }
}

template <class T, bool kSwiglu>
__global__ void elementwise_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float x = to_float(a[i]), y = to_float(b[i]);
    out[i] = from_float<T>(kSwiglu ? x / (1.0f + expf(-x)) * y : x + y);
  }
}

// out[r, :] = x[r, :] + bias. The grid's y dimension strides over rows and x over a row's columns,
// so the bias index is the column and needs no division. x and out are not __restrict__: out may
// alias x (each element is read before the same thread writes it).
template <class T>
__global__ void bias_add_kernel(const T* x, const T* __restrict__ bias, T* out, int64_t rows, int64_t n) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
      out[r * n + i] = from_float<T>(to_float(x[r * n + i]) + to_float(bias[i]));
    }
  }
}

template <class T>
cudaError_t launch_bias_add(const T* x, const T* bias, T* out, int64_t rows, int64_t n, cudaStream_t stream) {
  const dim3 blocks(unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 132 * 16)),
                    unsigned(std::min<int64_t>(rows, 65535)));
  bias_add_kernel<T><<<blocks, kThreads, 0, stream>>>(x, bias, out, rows, n);
  return cudaGetLastError();
}

template <bool kSwiglu>
void elementwise(const Tensor& a, const Tensor& b, const Tensor& out, Stream stream, const char* op) {
  dispatch_activation(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t n = out.numel();
    const unsigned blocks = unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 132 * 16));
    elementwise_kernel<T, kSwiglu><<<blocks, kThreads, 0, stream_of(stream)>>>(a.ptr<const T>(), b.ptr<const T>(), out.ptr<T>(), n);
    check_launch(cudaGetLastError(), op);
  });
}

template <bool kResidual>
void norm(const Tensor& x, const Tensor* residual, const Tensor& w, const Tensor& out, float eps, Stream stream, const char* op) {
  dispatch_activation(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t hidden = x.dim(x.rank - 1), rows = x.numel() / hidden;
    rms_norm_kernel<T, kResidual><<<unsigned(rows), kThreads, 0, stream_of(stream)>>>(
        x.ptr<const T>(), residual != nullptr ? residual->ptr<T>() : nullptr, w.ptr<const T>(), out.ptr<T>(), hidden, eps);
    check_launch(cudaGetLastError(), op);
  });
}

}  // namespace

void rms_norm(const RmsNormArgs& a) { norm<false>(a.x, nullptr, a.weight, a.out, a.eps, a.stream, "rms_norm"); }
void rms_norm_residual(const RmsNormResidualArgs& a) {
  norm<true>(a.x, &a.residual, a.weight, a.out, a.eps, a.stream, "rms_norm_residual");
}
void residual_add(const ResidualAddArgs& a) { elementwise<false>(a.a, a.b, a.out, a.stream, "residual_add"); }
void bias_add(const BiasAddArgs& a) {
  dispatch_activation(a.x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t n = a.bias.numel();
    check_launch(launch_bias_add<T>(a.x.ptr<const T>(), a.bias.ptr<const T>(), a.out.ptr<T>(), a.x.numel() / n, n,
                                    stream_of(a.stream)),
                 "bias_add");
  });
}
void swiglu(const SwigluArgs& a) { elementwise<true>(a.gate, a.up, a.out, a.stream, "swiglu"); }

}  // namespace decodelab::cuda
