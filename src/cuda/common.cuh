// Shared pieces of the CUDA kernels: element types, 16-byte vector loads widened to f32, warp
// reductions, the stream of a call and the one way launch errors become decodelab::Error.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
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

// Asynchronous copies into shared memory (PTX cp.async): kBytes (4, 8 or 16, both ends aligned to
// it) a thread, landing without passing through registers. A thread commits its copies in groups
// and waits for them in order; a barrier after the wait makes every thread's copies visible.
// 16-byte copies skip L1 (.cg), the smaller ones cannot (.ca).
template <int kBytes>
__device__ __forceinline__ void copy_async(void* dst, const void* src) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
  const unsigned to = unsigned(__cvta_generic_to_shared(dst));
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(to), "l"(src) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(to), "l"(src), "n"(kBytes) : "memory");
  }
}
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// cudaFuncSetAttribute for a kernel's dynamic shared memory, once per device (it costs a driver
// call, and the attribute stays set).
template <auto kKernel>
cudaError_t allow_dynamic_smem(int bytes) {
  static std::atomic<uint64_t> done{0};
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  const uint64_t bit = uint64_t(1) << (device % 64);
  if (done.load() & bit) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) done.fetch_or(bit);
  return e;
}

template <int kWidth>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace decodelab::cuda
