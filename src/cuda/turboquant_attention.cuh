// Host-side pieces and the rotation kernel shared by the fused attention kernels over paged
// caches of TurboQuant values (record_attention.cuh's CUDA-core kernel for TurboQuant, RaBitQ and
// QJL keys; turboquant_attention_mma.cu on the tensor cores): they project the query once into
// the keys' domain (R_K q, or QJL's S q), run a split kernel over the paged records (the
// split-merge of decode_attention.cuh) into o' in V's rotated domain, and rotate o' back.
#pragma once

#include <type_traits>

#include "cuda/cuda.h"
#include "cuda/decode_attention.cuh"
#include "cuda/turboquant_tables.h"

namespace decodelab::cuda::turboquant {

constexpr float kLog2e = 1.4426950408889634f;

// A TurboQuant side (keys or values) as the kernels read it. A split width (kvquant.h) has its
// first 32 * high_chunks coordinates at bits + 1 bits, coded with high_centroids, in a run of
// indices before the rest's.
struct CodeSide {
  const uint8_t* pages;  // [num_pages, page_size, Hkv, R]
  bool norm_corrected;
  int words;        // 4-byte words of a record (R / 4)
  int high_chunks;  // 0 at an integer width
  float centroids[16];
  float high_centroids[16];
};

// A split kernel's parameters: the key side (CodeSide, or another key codec's), the values, and
// q' [B, Hq, width]: scale * log2(e) * q projected into the keys' domain.
template <class KeySide>
struct RecordParams {
  KeySide k;
  CodeSide v;
  const float* q_rotated;
};
using TqParams = RecordParams<CodeSide>;

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

// y_i = factor * sum_j M[j][i] x_j, i < kOut, for every (b, head) row of x [B, H, kIn] into
// y [B, H, kOut]: q' = R q with M = R^T, out = R^T o' with M = R, QJL's q' = S q with M = S^T
// (kIn = D, kOut = m). A block takes up to 8 rows of one sequence and reads M once for them.
// Thread (i, part) sums column i over the part's kIn / parts rows of M, its loads issued up to 32
// at a time before the first is used (a warp reads consecutive floats of a row), so the block waits out
// one or two memory round trips instead of kIn of them; parts add in a fixed order.
template <int kOut>
constexpr int kRotateParts = kOut <= 256 ? 4 : 1024 / kOut;  // at most 1024 threads

template <class In, class Out, int kIn, int kOut>
__global__ void __launch_bounds__(kOut * kRotateParts<kOut>) rotate_rows_kernel(const In* x, const float* m,
                                                                                   float factor, int heads_total, Out* y) {
  constexpr int kParts = kRotateParts<kOut>, kSpan = kIn / kParts, kBlock = kOut * kParts;
  static_assert(kIn % kParts == 0, "parts of equal rows");
  __shared__ float x_s[kMaxHeadsPerBlock][kIn];
  __shared__ float part_s[kParts][kMaxHeadsPerBlock][kOut];
  const int b = blockIdx.y, first = blockIdx.x * kMaxHeadsPerBlock;
  const int i = threadIdx.x % kOut, part = threadIdx.x / kOut;
  const int heads = min(kMaxHeadsPerBlock, heads_total - first);
  const int64_t row0 = int64_t(b) * heads_total + first;
  for (int e = threadIdx.x; e < heads * kIn; e += kBlock) x_s[e / kIn][e % kIn] = to_float(x[row0 * kIn + e]);
  __syncthreads();
  // Loads in flight: all of a short part, else 32 (16 where 32 does not divide it: D = 96, m = 512).
  constexpr int kBatch = kSpan <= 32 ? kSpan : kSpan % 32 == 0 ? 32 : 16;
  static_assert(kSpan % kBatch == 0, "a part is whole batches");
  float sum[kMaxHeadsPerBlock] = {};
#pragma unroll
  for (int j0 = part * kSpan; j0 < (part + 1) * kSpan; j0 += kBatch) {
    float mji[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) mji[j] = m[int64_t(j0 + j) * kOut + i];
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
  for (int e = threadIdx.x; e < heads * kOut; e += kBlock) {
    const int g = e / kOut, d = e % kOut;
    float total = 0.0f;
#pragma unroll
    for (int q = 0; q < kParts; ++q) total += part_s[q][g][d];
    y[row0 * kOut + e] = from_float<Out>(total * factor);
  }
}

template <class In, class Out, int kIn, int kOut>
void launch_rotate_rows(const In* x, const float* m, float factor, int batch, int heads, Out* y, cudaStream_t stream) {
  const dim3 grid(unsigned((heads + kMaxHeadsPerBlock - 1) / kMaxHeadsPerBlock), unsigned(batch));
  rotate_rows_kernel<In, Out, kIn, kOut><<<grid, kOut * kRotateParts<kOut>, 0, stream>>>(x, m, factor, heads, y);
}

// The side of `codec`'s records in `pool`: records of whole words and a split at a multiple of 32
// coordinates (the supports() functions refuse others).
inline CodeSide make_side(const Tensor& pool, const kvquant::TurboQuantMse& codec) {
  CodeSide s{};
  s.pages = static_cast<const uint8_t*>(pool.data);
  s.norm_corrected = codec.config().scale == kvquant::ScaleMode::norm_corrected;
  s.words = int(codec.record_bytes() / 4);
  s.high_chunks = int(codec.config().high_bits_channels / 32);
  const auto c = codec.codebook().centroids();
  for (size_t i = 0; i < c.size(); ++i) s.centroids[i] = float(c[i]);
  if (const kvquant::Codebook* high = codec.high_codebook(); high != nullptr) {
    for (size_t i = 0; i < high->centroids().size(); ++i) s.high_centroids[i] = float(high->centroids()[i]);
  }
  return s;
}

// The whole call for one q dtype T and head_dim kD around a split kernel
// (const RecordParams<KeySide>, DecodeParams) of kThreads threads and kBytes of dynamic shared
// memory, whose splits are at least kMinSplit tokens (its tile), for the arguments `a` of an op
// whose values are TurboQuant records (a.cache.v_codec): k_side is the keys as the kernel reads
// them, projection_t (kD x kWidth f32) takes q into their domain. Returns the first failure.
template <class T, int kD, int kWidth, auto kKernel, int kThreads, int kBytes, int kMinSplit, class Args, class KeySide>
cudaError_t launch_record_attention(const Args& a, const KeySide& k_side, const float* projection_t,
                                    cudaStream_t stream) {
  constexpr auto kernel = kKernel;
  const auto& c = a.cache;
  DeviceRotation v_rot;
  if (const cudaError_t e = device_rotation(c.v_codec->rotation(), stream, &v_rot); e != cudaSuccess) return e;
  if (const cudaError_t e = allow_dynamic_smem<kernel>(kBytes); e != cudaSuccess) return e;

  const int batch = int(a.q.dim(0)), hq = int(a.q.dim(1));
  RecordParams<KeySide> params{k_side, make_side(c.v_pages, *c.v_codec), nullptr};
  DecodeParams p{};
  p.lengths = c.lengths.template ptr<const int32_t>();
  p.page_table = c.page_table.template ptr<const int32_t>();
  p.table_stride = c.page_table.dim(1);
  p.page_size = int(c.k_pages.dim(1));
  p.hq = hq;
  p.hkv = int(c.k_pages.dim(2));
  p.group = hq / p.hkv;
  p.chunks = (p.group + kMaxHeadsPerBlock - 1) / kMaxHeadsPerBlock;
  const int64_t capacity = p.table_stride * p.page_size;
  p.splits = choose_splits(p, batch, capacity, resident_blocks<kernel>(kThreads, kBytes), kMinSplit);

  // q' [B, Hq, kWidth] and o' [B, Hq, kD], f32, in one scratch buffer.
  const size_t heads = size_t(batch) * size_t(hq);
  float* rotated = nullptr;
  if (const cudaError_t e =
          scratch_alloc(reinterpret_cast<void**>(&rotated), heads * (kWidth + kD) * sizeof(float), stream);
      e != cudaSuccess) {
    return e;
  }
  params.q_rotated = rotated;
  p.out = rotated + heads * kWidth;
  launch_rotate_rows<T, float, kD, kWidth>(a.q.template ptr<const T>(), projection_t, a.options.scale * kLog2e, batch,
                                           hq, rotated, stream);
  cudaError_t status = launch_split_merge<float, kD>(p, batch, stream, [&](dim3 grid, const DecodeParams& dp) {
    kernel<<<grid, kThreads, kBytes, stream>>>(params, dp);
  });
  if (status == cudaSuccess) {
    launch_rotate_rows<float, T, kD, kD>(static_cast<const float*>(p.out), v_rot.inverse, 1.0f, batch, hq,
                                         a.out.template ptr<T>(), stream);
    status = cudaGetLastError();
  }
  const cudaError_t freed = scratch_free(rotated, stream);
  return status != cudaSuccess ? status : freed;
}

// launch_record_attention with TurboQuant keys, q' = R_K q (the tensor-core kernel's launch).
template <class T, int kD, auto kKernel, int kThreads, int kBytes, int kMinSplit>
cudaError_t launch_turboquant_attention(const TurboQuantDecodeAttentionPagedArgs& a, cudaStream_t stream) {
  DeviceRotation k_rot;
  if (const cudaError_t e = device_rotation(a.cache.k_codec->rotation(), stream, &k_rot); e != cudaSuccess) return e;
  return launch_record_attention<T, kD, kD, kKernel, kThreads, kBytes, kMinSplit>(
      a, make_side(a.cache.k_pages, *a.cache.k_codec), k_rot.forward_t, stream);
}

// Runtime value -> template, over the kernel's set kValues (head_dims, bit widths, sketch sizes;
// its supports() states the same set): fn(std::integral_constant<int, v>), or
// cudaErrorInvalidValue for a value outside the set.
template <int... kValues, class Fn>
cudaError_t with_one_of(int64_t v, Fn&& fn) {
  cudaError_t status = cudaErrorInvalidValue;
  ((v == kValues ? (status = fn(std::integral_constant<int, kValues>{}), true) : false) || ...);
  return status;
}

}  // namespace decodelab::cuda::turboquant
