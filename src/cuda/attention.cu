// CUDA decode attention over contiguous and paged KV caches (Sq = 1): the split kernel, the
// cuda.tiled variant, and the adapters. The stable `cuda` backend runs the tensor-core kernel of
// attention_mma.cu for f16 and bf16, and the split kernel for f32. The plan they share is in decode_attention.cuh.
//
// The split kernel: every K and V byte is read once. Each token is read by kLanes lanes with
// 16-byte loads; a warp covers 32 / kLanes tokens per step; scores and an online softmax (running
// max, sum, accumulator) stay in registers.
#include <algorithm>

#include "cuda/cuda.h"
#include "cuda/decode_attention.cuh"

namespace decodelab::cuda {
namespace {

constexpr int kWarps = 4;

template <class T, int kD, bool kPaged>
__global__ void __launch_bounds__(kWarps * 32) decode_split_kernel(DecodeParams p) {
  constexpr int kV = kVec<T>;
  constexpr int kLanes = kD / kV;        // lanes per token
  constexpr int kGroups = 32 / kLanes;   // tokens per warp step
  static_assert(kLanes <= 32 && 32 % kLanes == 0, "head_dim must give 1..32 lanes per token");
  const int split = blockIdx.x, b = blockIdx.z;
  const int h = blockIdx.y / p.chunks, chunk = blockIdx.y % p.chunks;
  const int first_head = h * p.group + chunk * kMaxHeadsPerBlock;
  const int heads = min(kMaxHeadsPerBlock, p.group - chunk * kMaxHeadsPerBlock);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int slot = lane / kLanes, sub = lane % kLanes;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  float qv[kMaxHeadsPerBlock][kV];
#pragma unroll
  for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
    if (g < heads) {
      load_vec(q + (int64_t(b) * p.hq + first_head + g) * kD + sub * kV, qv[g]);
#pragma unroll
      for (int i = 0; i < kV; ++i) qv[g][i] *= p.scale;
    }
  }

  int64_t begin, end;
  split_range<1>(p, b, split, begin, end);

  float m[kMaxHeadsPerBlock], l[kMaxHeadsPerBlock], acc[kMaxHeadsPerBlock][kV];
#pragma unroll
  for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < kV; ++i) acc[g][i] = 0.0f;
  }
  // Every lane runs the same number of steps so that the shuffles see full warps. kUnroll tokens
  // per lane are loaded before any is used, so that enough bytes are in flight to cover latency.
  constexpr int kUnroll = 4;
  for (int64_t base = begin + warp * kGroups * kUnroll; base < end; base += kWarps * kGroups * kUnroll) {
    float kv[kUnroll][kV], vv[kUnroll][kV];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = base + u * kGroups + slot;
      valid[u] = t < end;
      if (valid[u]) {
        const int64_t at = kv_offset<kD, kPaged>(p, b, h, t) + sub * kV;
        load_vec_stream(k + at, kv[u]);
        load_vec_stream(v + at, vv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
        if (g >= heads) continue;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kV; ++i) dot += valid[u] ? qv[g][i] * kv[u][i] : 0.0f;
        const float s = group_sum<kLanes>(dot);
        if (!valid[u]) continue;
        const float m_new = fmaxf(m[g], s);
        const float correction = __expf(m[g] - m_new), w = __expf(s - m_new);
        l[g] = l[g] * correction + w;
#pragma unroll
        for (int i = 0; i < kV; ++i) acc[g][i] = acc[g][i] * correction + w * vv[u][i];
        m[g] = m_new;
      }
    }
  }

  // Merge the token slots of the warp (lanes sub, sub + kLanes, ...), then the warps.
#pragma unroll
  for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
#pragma unroll
    for (int offset = kLanes; offset < 32; offset *= 2) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[g], offset);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[g], offset);
      const float m_new = fmaxf(m[g], m_o);
      const float a = m[g] == -INFINITY ? 0.0f : expf(m[g] - m_new);
      const float c = m_o == -INFINITY ? 0.0f : expf(m_o - m_new);
      l[g] = l[g] * a + l_o * c;
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        const float acc_o = __shfl_xor_sync(0xffffffffu, acc[g][i], offset);
        acc[g][i] = acc[g][i] * a + acc_o * c;
      }
      m[g] = m_new;
    }
  }
  __shared__ float s_acc[kWarps][kMaxHeadsPerBlock][kD];
  __shared__ float s_m[kWarps][kMaxHeadsPerBlock], s_l[kWarps][kMaxHeadsPerBlock];
  if (slot == 0) {
#pragma unroll
    for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
#pragma unroll
      for (int i = 0; i < kV; ++i) s_acc[warp][g][sub * kV + i] = acc[g][i];
      if (sub == 0) s_m[warp][g] = m[g], s_l[warp][g] = l[g];
    }
  }
  __syncthreads();
  finish_block<T, kD, kWarps>(p, b, first_head, heads, split, s_acc, s_m, s_l);
}

// ------------------------------------------------------------------------------------------------
// cuda.tiled: the block stages tiles of K and V (16 KB each) in shared memory with cp.async, two
// tiles in flight, and works on a whole tile at a time in three phases, so that each token costs a
// few shared-memory reads and FMAs and no shuffles, and the softmax rescales once per tile:
//   1. scores: kThreadsPerToken threads per token, each a 128-byte slice of the K row against the
//      same slice of every query head of the group (queries pre-scaled by scale * log2(e));
//   2. softmax: a warp per head takes the tile's maximum, turns scores into exp2 weights, and
//      updates the running maximum and sum (the factor for the old accumulator goes to smem);
//   3. values: each thread owns kDimsPerThread output dims of every head and adds the tile's
//      weighted V rows (threads beyond D take every other token, merged at the end).
// K rows are stored with their 16-byte chunks permuted (XOR by the token and the slice) so that the
// eight threads of a shared-memory phase hit eight different bank groups in phase 1.
namespace tiled {

constexpr int kThreads = 128;

template <class T, int kD>
struct Shape {
  static constexpr int kRowBytes = kD * int(sizeof(T));
  static constexpr int kChunks = kRowBytes / 16;             // 16-byte chunks per row
  static constexpr int kTile = 16384 / kRowBytes;            // tokens per tile: 16 KB of K
  static constexpr int kThreadsPerToken = kThreads / kTile;  // phase 1: each takes 128 bytes
  static constexpr int kDimThreads = kD < kThreads ? kD : kThreads;
  static constexpr int kDimsPerThread = kD / kDimThreads;
  static constexpr int kTokenGroups = kThreads / kDimThreads;
  static_assert(kChunks == 8 * kThreadsPerToken, "a phase-1 thread reads 8 chunks");
  // A query row in shared memory: each slice padded by 4 floats, so the slices that phase 1 reads
  // at once start in different banks.
  static constexpr int kSliceElems = kD / kThreadsPerToken;
  static constexpr int kQueryStride = kD + 4 * kThreadsPerToken;
  // Dynamic shared memory: two stages of K and V tiles, then the f32 queries and weights.
  static constexpr int kStageBytes = 2 * kTile * kRowBytes;
  static constexpr int kQueryOffset = 2 * kStageBytes;
  static constexpr int kWeightOffset = kQueryOffset + kMaxHeadsPerBlock * kQueryStride * 4;
  static constexpr int kBytes = kWeightOffset + kTile * kMaxHeadsPerBlock * 4;
};

// Where chunk c of token t's K row is stored: the chunk's slice keeps its 8 chunks, permuted by
// XOR with (t's place among the tokens of a phase, the slice) so the phase's threads differ mod 8.
template <class S>
__device__ __forceinline__ int k_chunk(int t, int c) {
  const int slice = c / 8, mix = (t % (8 / S::kThreadsPerToken)) * S::kThreadsPerToken + slice;
  return slice * 8 + ((c % 8) ^ mix);
}


template <class T, int kD, bool kPaged>
__global__ void __launch_bounds__(kThreads) decode_kernel(DecodeParams p) {
  using S = Shape<T, kD>;
  extern __shared__ __align__(16) unsigned char smem[];
  float* q_s = reinterpret_cast<float*>(smem + S::kQueryOffset);     // [heads][kQueryStride]
  float* w_s = reinterpret_cast<float*>(smem + S::kWeightOffset);    // [kTile][kMaxHeadsPerBlock]
  __shared__ float m_s[kMaxHeadsPerBlock], l_s[kMaxHeadsPerBlock], rescale_s[kMaxHeadsPerBlock];

  const int split = blockIdx.x, b = blockIdx.z;
  const int h = blockIdx.y / p.chunks, chunk = blockIdx.y % p.chunks;
  const int first_head = h * p.group + chunk * kMaxHeadsPerBlock;
  const int heads = min(kMaxHeadsPerBlock, p.group - chunk * kMaxHeadsPerBlock);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  constexpr float kLog2e = 1.4426950408889634f;

  const T* q = static_cast<const T*>(p.q);
  for (int i = tid; i < heads * kD; i += kThreads) {
    const int g = i / kD, e = i % kD;
    q_s[g * S::kQueryStride + e + e / S::kSliceElems * 4] =
        to_float(q[(int64_t(b) * p.hq + first_head) * kD + i]) * p.scale * kLog2e;
  }
  if (tid < kMaxHeadsPerBlock) m_s[tid] = -INFINITY, l_s[tid] = 0.0f;
  __syncthreads();  // an empty split reads m_s and l_s at the end without entering the tile loop

  int64_t begin, end;
  split_range<1>(p, b, split, begin, end);
  const int tiles = int((end - begin + S::kTile - 1) / S::kTile);

  const unsigned char* k = static_cast<const unsigned char*>(p.k);
  const unsigned char* v = static_cast<const unsigned char*>(p.v);
  auto load_tile = [&](int tile) {
    unsigned char* k_tile = smem + (tile % 2) * S::kStageBytes;
    unsigned char* v_tile = k_tile + S::kTile * S::kRowBytes;
    const int64_t first = begin + int64_t(tile) * S::kTile;
    for (int i = tid; i < S::kTile * S::kChunks; i += kThreads) {
      const int t = i / S::kChunks, c = i % S::kChunks;
      if (first + t >= end) break;  // i grows with t: the rest are past the end too
      const int64_t at = kv_offset<kD, kPaged>(p, b, h, first + t) * int64_t(sizeof(T)) + c * 16;
      copy_async<16>(k_tile + t * S::kRowBytes + k_chunk<S>(t, c) * 16, k + at);
      copy_async<16>(v_tile + t * S::kRowBytes + c * 16, v + at);
    }
    commit_copies();
  };

  float acc[kMaxHeadsPerBlock][S::kDimsPerThread] = {};
  const int dim0 = (tid % S::kDimThreads) * S::kDimsPerThread, token_group = tid / S::kDimThreads;
  if (tiles > 0) load_tile(0);
  for (int tile = 0; tile < tiles; ++tile) {
    if (tile + 1 < tiles) {
      load_tile(tile + 1);
      wait_copies<1>();
    } else {
      wait_copies<0>();
    }
    __syncthreads();
    const unsigned char* k_tile = smem + (tile % 2) * S::kStageBytes;
    const unsigned char* v_tile = k_tile + S::kTile * S::kRowBytes;
    const int count = int(min(int64_t(S::kTile), end - begin - int64_t(tile) * S::kTile));

    // 1. Scores.
    {
      const int t = tid / S::kThreadsPerToken, slice = tid % S::kThreadsPerToken;
      float dot[kMaxHeadsPerBlock] = {};
      if (t < count) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int c = slice * 8 + j;
          const uint4 raw = *reinterpret_cast<const uint4*>(k_tile + t * S::kRowBytes + k_chunk<S>(t, c) * 16);
          const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
            if (g >= heads) break;
            const float* qg = q_s + g * S::kQueryStride + slice * (S::kSliceElems + 4) + j * kVec<T>;
#pragma unroll
            for (int i = 0; i < kVec<T>; ++i) dot[g] = fmaf(qg[i], to_float(e[i]), dot[g]);
          }
        }
      }
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
        if (g >= heads) break;
        const float score = group_sum<S::kThreadsPerToken>(dot[g]);
        if (slice == 0) w_s[t * kMaxHeadsPerBlock + g] = t < count ? score : -INFINITY;
      }
    }
    __syncthreads();

    // 2. Softmax over the tile, a warp per head.
    for (int g = warp; g < heads; g += kThreads / 32) {
      float tile_max = -INFINITY;
      for (int t = lane; t < count; t += 32) tile_max = fmaxf(tile_max, w_s[t * kMaxHeadsPerBlock + g]);
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
      const float m_old = m_s[g], m_new = fmaxf(m_old, tile_max);
      float sum = 0.0f;
      for (int t = lane; t < count; t += 32) {
        const float w = exp2f(w_s[t * kMaxHeadsPerBlock + g] - m_new);
        w_s[t * kMaxHeadsPerBlock + g] = w;
        sum += w;
      }
      sum = group_sum<32>(sum);
      __syncwarp();
      if (lane == 0) {
        const float rescale = exp2f(m_old - m_new);  // 0 while m_old is -inf
        rescale_s[g] = rescale;
        l_s[g] = l_s[g] * rescale + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();

    // 3. Values.
#pragma unroll
    for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
      if (g >= heads) break;
#pragma unroll
      for (int i = 0; i < S::kDimsPerThread; ++i) acc[g][i] *= rescale_s[g];
    }
    for (int t = token_group; t < count; t += S::kTokenGroups) {
      float vv[S::kDimsPerThread];
      const T* row = reinterpret_cast<const T*>(v_tile + t * S::kRowBytes) + dim0;
#pragma unroll
      for (int i = 0; i < S::kDimsPerThread; ++i) vv[i] = to_float(row[i]);
      const float4* w4 = reinterpret_cast<const float4*>(w_s + t * kMaxHeadsPerBlock);
      const float4 wa = w4[0], wb = w4[1];
      const float w[kMaxHeadsPerBlock] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
        if (g >= heads) break;
#pragma unroll
        for (int i = 0; i < S::kDimsPerThread; ++i) acc[g][i] = fmaf(w[g], vv[i], acc[g][i]);
      }
    }
    __syncthreads();  // the stage is reloaded by the next iteration
  }

  // Token groups (D < 128 threads) add up through shared memory, in a fixed order.
  float* sum_s = reinterpret_cast<float*>(smem);  // the K/V stages are free now
  if constexpr (S::kTokenGroups > 1) {
#pragma unroll
    for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
#pragma unroll
      for (int i = 0; i < S::kDimsPerThread; ++i) sum_s[(token_group * kMaxHeadsPerBlock + g) * kD + dim0 + i] = acc[g][i];
    }
    __syncthreads();
    if (token_group == 0) {
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
#pragma unroll
        for (int i = 0; i < S::kDimsPerThread; ++i) {
          float total = 0.0f;
          for (int tg = 0; tg < S::kTokenGroups; ++tg) total += sum_s[(tg * kMaxHeadsPerBlock + g) * kD + dim0 + i];
          acc[g][i] = total;
        }
      }
    }
  }
  if (token_group != 0) return;
  for (int g = 0; g < heads; ++g) {
    const int head = first_head + g;
    // The partials keep the natural-log convention of the merge kernel: m in units of ln.
    const float m = m_s[g] / kLog2e, l = l_s[g];
#pragma unroll
    for (int i = 0; i < S::kDimsPerThread; ++i) {
      const int d = dim0 + i;
      if (p.splits == 1) {
        static_cast<T*>(p.out)[(int64_t(b) * p.hq + head) * kD + d] = from_float<T>(acc[g][i] / l);
      } else {
        float* part = p.partial + ((int64_t(b) * p.hq + head) * p.splits + split) * (kD + 2);
        part[d] = acc[g][i];
        if (d == 0) part[kD] = m, part[kD + 1] = l;
      }
    }
  }
}

}  // namespace tiled

// stable (`cuda`): the tensor-core kernel for f16 and bf16, the split kernel for f32.
enum class Variant { stable, tiled };

template <class T, int kD, bool kPaged, Variant kVariant>
cudaError_t launch_decode(DecodeParams p, int batch, int64_t capacity, cudaStream_t stream) {
  p.chunks = (p.group + kMaxHeadsPerBlock - 1) / kMaxHeadsPerBlock;
  if constexpr (kVariant == Variant::stable && sizeof(T) == 2) {
    return launch_decode_mma<T, kD, kPaged>(p, batch, capacity, stream);
  } else if constexpr (kVariant == Variant::tiled) {
    using S = tiled::Shape<T, kD>;
    p.splits = choose_splits(p, batch, capacity, 4, S::kTile);
    constexpr auto kernel = tiled::decode_kernel<T, kD, kPaged>;
    if (const cudaError_t e = allow_dynamic_smem<kernel>(S::kBytes); e != cudaSuccess) return e;
    return launch_split_merge<T, kD>(p, batch, stream, [&](dim3 grid, const DecodeParams& params) {
      kernel<<<grid, tiled::kThreads, S::kBytes, stream>>>(params);
    });
  } else {
    // Enough blocks for eight per SM, but no split shorter than 128 tokens.
    p.splits = choose_splits(p, batch, capacity, 8, 128);
    return launch_split_merge<T, kD>(p, batch, stream, [&](dim3 grid, const DecodeParams& params) {
      decode_split_kernel<T, kD, kPaged><<<grid, kWarps * 32, 0, stream>>>(params);
    });
  }
}

// head_dim -> template; the supported set is stated once here and in supports().
template <class T, bool kPaged, Variant kVariant>
cudaError_t launch_for_head_dim(const DecodeParams& p, int d, int batch, int64_t capacity, cudaStream_t s) {
  switch (d) {
    case 64: return launch_decode<T, 64, kPaged, kVariant>(p, batch, capacity, s);
    case 128: return launch_decode<T, 128, kPaged, kVariant>(p, batch, capacity, s);
    default:
      if constexpr (sizeof(T) == 2) return launch_decode<T, 256, kPaged, kVariant>(p, batch, capacity, s);
      return cudaErrorInvalidValue;
  }
}

template <bool kPaged, Variant kVariant, class Cache>
void run(const Tensor& q, const Cache& cache, const Tensor& out, float scale, Stream stream, const char* op) {
  DecodeParams p{};
  p.q = q.data;
  p.out = out.data;
  p.hq = int(q.dim(2));
  p.scale = scale;
  int64_t capacity;
  if constexpr (kPaged) {
    p.k = cache.k_pages.data, p.v = cache.v_pages.data;
    p.hkv = int(cache.k_pages.dim(2));
    p.page_table = cache.page_table.template ptr<const int32_t>();
    p.table_stride = cache.page_table.dim(1);
    p.page_size = int(cache.k_pages.dim(1));
    capacity = p.table_stride * p.page_size;
  } else {
    p.k = cache.k.data, p.v = cache.v.data;
    p.hkv = int(cache.k.dim(1));
    p.s_max = cache.k.dim(2);
    capacity = p.s_max;
  }
  p.lengths = cache.lengths.template ptr<const int32_t>();
  p.group = p.hq / p.hkv;
  dispatch_activation(q.dtype, [&](auto tag) {
    using T = decltype(tag);
    check_launch(launch_for_head_dim<T, kPaged, kVariant>(p, int(q.dim(3)), int(q.dim(0)), capacity, stream_of(stream)), op);
  });
}

}  // namespace

void decode_attention(const DecodeAttentionArgs& a) {
  run<false, Variant::stable>(a.q, a.cache, a.out, a.options.scale, a.stream, "decode_attention");
}
void decode_attention_paged(const DecodeAttentionPagedArgs& a) {
  run<true, Variant::stable>(a.q, a.cache, a.out, a.options.scale, a.stream, "decode_attention_paged");
}
void decode_attention_tiled(const DecodeAttentionArgs& a) {
  run<false, Variant::tiled>(a.q, a.cache, a.out, a.options.scale, a.stream, "decode_attention");
}
void decode_attention_paged_tiled(const DecodeAttentionPagedArgs& a) {
  run<true, Variant::tiled>(a.q, a.cache, a.out, a.options.scale, a.stream, "decode_attention_paged");
}

}  // namespace decodelab::cuda
