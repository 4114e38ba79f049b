// Host-side pieces and the rotation kernel shared by the two fused TurboQuant attention kernels
// (turboquant_attention.cu on the CUDA cores, turboquant_attention_mma.cu on the tensor cores):
// both rotate the query once into K's rotated domain, run a split kernel over the paged records
// (the split-merge of decode_attention.cuh) into o' in V's rotated domain, and rotate o' back.
#pragma once

#include <type_traits>

#include "cuda/cuda.h"
#include "cuda/decode_attention.cuh"
#include "cuda/turboquant_tables.h"

namespace decodelab::cuda::turboquant {

constexpr float kLog2e = 1.4426950408889634f;

// One side (keys or values) as the kernel reads it.
struct CodeSide {
  const uint8_t* pages;  // [num_pages, page_size, Hkv, R]
  bool norm_corrected;
  float centroids[16];
};

struct TqParams {
  CodeSide k, v;
  const float* q_rotated;  // [B, Hq, D]: scale * log2(e) * R_K q
};

// The (split, KV-head chunk) of this block of launch_split_merge's grid (splits x (Hkv * chunks)
// x B), taken with the head chunk varying fastest in launch order. A token's records for the Hkv
// heads sit side by side in a page, each only 4-byte aligned and a fraction of a DRAM burst, so
// the blocks that read them should run together: then the sectors one block's record shares
// with its neighbours' are served from L2, not fetched again for each head.
struct BlockCoordinates {
  int split, head_chunk;
};
__device__ __forceinline__ BlockCoordinates block_coordinates() {
  const int id = blockIdx.x + blockIdx.y * gridDim.x;
  return {id / int(gridDim.y), id % int(gridDim.y)};
}

// y_i = factor * sum_j M[j][i] x_j for every (b, head) row of x [B, H, kD]: q' = R q with M = R^T,
// out = R^T o' with M = R. A block takes up to 8 rows of one sequence and reads M once for them.
// Thread (i, part) sums column i over the part's kD / kRotateParts rows of M, its loads issued 32
// at a time before the first is used (a warp reads consecutive floats of a row), so the block
// waits out one or two memory round trips instead of kD of them; parts add in a fixed order.
constexpr int kRotateParts = 4;

template <class In, class Out, int kD>
__global__ void __launch_bounds__(kD * kRotateParts) rotate_rows_kernel(const In* x, const float* m, float factor,
                                                                         int heads_total, Out* y) {
  constexpr int kSpan = kD / kRotateParts;
  __shared__ float x_s[kMaxHeadsPerBlock][kD];
  __shared__ float part_s[kRotateParts][kMaxHeadsPerBlock][kD];
  const int b = blockIdx.y, first = blockIdx.x * kMaxHeadsPerBlock;
  const int i = threadIdx.x % kD, part = threadIdx.x / kD;
  const int heads = min(kMaxHeadsPerBlock, heads_total - first);
  const int64_t row0 = int64_t(b) * heads_total + first;
  for (int e = threadIdx.x; e < heads * kD; e += kD * kRotateParts) x_s[e / kD][e % kD] = to_float(x[row0 * kD + e]);
  __syncthreads();
  constexpr int kBatch = kSpan < 32 ? kSpan : 32;  // loads in flight: all of a D <= 128 part
  float sum[kMaxHeadsPerBlock] = {};
#pragma unroll
  for (int j0 = part * kSpan; j0 < (part + 1) * kSpan; j0 += kBatch) {
    float mji[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) mji[j] = m[int64_t(j0 + j) * kD + i];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
        if (g < heads) sum[g] = fmaf(mji[j], x_s[g][j0 + j], sum[g]);
      }
    }
  }
  for (int g = 0; g < heads; ++g) part_s[part][g][i] = sum[g];
  __syncthreads();
  for (int e = threadIdx.x; e < heads * kD; e += kD * kRotateParts) {
    const int g = e / kD, d = e % kD;
    float total = 0.0f;
#pragma unroll
    for (int q = 0; q < kRotateParts; ++q) total += part_s[q][g][d];
    y[row0 * kD + e] = from_float<Out>(total * factor);
  }
}

template <class In, class Out, int kD>
void launch_rotate_rows(const In* x, const float* m, float factor, int batch, int heads, Out* y, cudaStream_t stream) {
  const dim3 grid(unsigned((heads + kMaxHeadsPerBlock - 1) / kMaxHeadsPerBlock), unsigned(batch));
  rotate_rows_kernel<In, Out, kD><<<grid, kD * kRotateParts, 0, stream>>>(x, m, factor, heads, y);
}

inline CodeSide make_side(const Tensor& pool, const kvquant::TurboQuantMse& codec) {
  CodeSide s{};
  s.pages = static_cast<const uint8_t*>(pool.data);
  s.norm_corrected = codec.config().scale == kvquant::ScaleMode::norm_corrected;
  const auto c = codec.codebook().centroids();
  for (size_t i = 0; i < c.size(); ++i) s.centroids[i] = float(c[i]);
  return s;
}

// The whole call for one q dtype T and head_dim kD around a split kernel
// (const TqParams, DecodeParams) of kThreads threads and kBytes of dynamic shared memory, whose
// splits are at least kMinSplit tokens (its tile): returns the first failure.
template <class T, int kD, auto kKernel, int kThreads, int kBytes, int kMinSplit>
cudaError_t launch_turboquant_attention(const TurboQuantDecodeAttentionPagedArgs& a, cudaStream_t stream) {
  constexpr auto kernel = kKernel;
  const PagedTurboQuantKV& c = a.cache;
  DeviceRotation k_rot, v_rot;
  if (const cudaError_t e = device_rotation(c.k_codec->rotation(), stream, &k_rot); e != cudaSuccess) return e;
  if (const cudaError_t e = device_rotation(c.v_codec->rotation(), stream, &v_rot); e != cudaSuccess) return e;
  if (const cudaError_t e = allow_dynamic_smem<kernel>(kBytes); e != cudaSuccess) return e;

  const int batch = int(a.q.dim(0)), hq = int(a.q.dim(1));
  TqParams tq{make_side(c.k_pages, *c.k_codec), make_side(c.v_pages, *c.v_codec), nullptr};
  DecodeParams p{};
  p.lengths = c.lengths.ptr<const int32_t>();
  p.page_table = c.page_table.ptr<const int32_t>();
  p.table_stride = c.page_table.dim(1);
  p.page_size = int(c.k_pages.dim(1));
  p.hq = hq;
  p.hkv = int(c.k_pages.dim(2));
  p.group = hq / p.hkv;
  p.chunks = (p.group + kMaxHeadsPerBlock - 1) / kMaxHeadsPerBlock;
  const int64_t capacity = p.table_stride * p.page_size;
  p.splits = choose_splits(p, batch, capacity, resident_blocks<kernel>(kThreads, kBytes), kMinSplit);

  // q' and o', [B, Hq, D] f32 each, in one scratch buffer.
  const size_t rows = size_t(batch) * size_t(hq) * kD;
  float* rotated = nullptr;
  if (const cudaError_t e = scratch_alloc(reinterpret_cast<void**>(&rotated), 2 * rows * sizeof(float), stream);
      e != cudaSuccess) {
    return e;
  }
  tq.q_rotated = rotated;
  p.out = rotated + rows;
  launch_rotate_rows<T, float, kD>(a.q.ptr<const T>(), k_rot.forward_t, a.options.scale * kLog2e, batch, hq, rotated,
                                   stream);
  cudaError_t status = launch_split_merge<float, kD>(p, batch, stream, [&](dim3 grid, const DecodeParams& params) {
    kernel<<<grid, kThreads, kBytes, stream>>>(tq, params);
  });
  if (status == cudaSuccess) {
    launch_rotate_rows<float, T, kD>(rotated + rows, v_rot.inverse, 1.0f, batch, hq, a.out.ptr<T>(), stream);
    status = cudaGetLastError();
  }
  const cudaError_t freed = scratch_free(rotated, stream);
  return status != cudaSuccess ? status : freed;
}

// Runtime bits -> template: the supported set is stated here and in supports() (supports.cpp).
template <class Fn>
cudaError_t with_bits(int bits, Fn&& fn) {
  switch (bits) {
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    default: return cudaErrorInvalidValue;
  }
}

// Runtime head_dim -> template, over the kernel's set kDims (its supports() states the same set).
template <int... kDims, class Fn>
cudaError_t with_head_dim(int64_t d, Fn&& fn) {
  cudaError_t status = cudaErrorInvalidValue;
  ((d == kDims ? (status = fn(std::integral_constant<int, kDims>{}), true) : false) || ...);
  return status;
}

}  // namespace decodelab::cuda::turboquant
