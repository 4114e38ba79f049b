// Shared pieces of the CUDA kernels: element types, 16-byte vector loads widened to f32, warp
// reductions, the stream of a call and the one way launch errors become decodelab::Error.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/scratch.h"
#include "decodelab/dtype.h"
#include "decodelab/tensor.h"

namespace decodelab::cuda {

// The stream of a call: the caller's, or the per-thread default stream (never the legacy one).
inline cudaStream_t stream_of(Stream s) {
  return s.handle != nullptr ? static_cast<cudaStream_t>(s.handle) : cudaStreamPerThread;
}

// Throws decodelab::Error naming the op when a launch (or the call before it) failed.
void check_launch(cudaError_t status, const char* op);

// Element types by dtype: float, __half, __nv_bfloat16.
template <class Fn>
decltype(auto) dispatch_activation(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f16: return fn(__half{});
    case DType::bf16: return fn(__nv_bfloat16{});
    default: return fn(float{});
  }
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements of T in one 16-byte access.
template <class T>
inline constexpr int kVec = 16 / int(sizeof(T));

// Loads kVec<T> elements (16 bytes, aligned) and widens them to f32.
template <class T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[kVec<T>]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_float(e[i]);
}

// Streaming load that does not keep the line in L1 (K/V and weights are read once).
template <class T>
__device__ __forceinline__ void load_vec_stream(const T* __restrict__ p, float (&out)[kVec<T>]) {
  const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_float(e[i]);
}

template <int kWidth>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace decodelab::cuda
