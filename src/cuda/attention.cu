// CUDA decode attention over contiguous and paged KV caches (Sq = 1).
//
// Memory-bound: every K and V byte is read once. A block owns one (sequence, KV head, split of
// the length) and up to 8 query heads of that KV head's GQA group, so K/V are read once per group.
// Each token is read by kLanes lanes with 16-byte loads; a warp covers 32 / kLanes tokens per step;
// scores and an online softmax (running max, sum, accumulator) stay in registers. Splits of the
// length give batch 1 enough blocks to fill the GPU; a second kernel merges them with log-sum-exp
// in a fixed order, so results are bit-identical run to run.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/cuda.h"

namespace decodelab::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxHeadsPerBlock = 8;

struct DecodeParams {
  const void* q;  // [B, 1, Hq, D]
  const void* k;  // contiguous [B, Hkv, S_max, D] or pools [pages, page_size, Hkv, D]
  const void* v;
  const int32_t* lengths;     // [B]
  const int32_t* page_table;  // [B, table_stride], paged only
  int64_t table_stride;
  int page_size;
  int64_t s_max;
  int hq, hkv, group, chunks, splits;
  float scale;
  void* out;       // [B, 1, Hq, D]
  float* partial;  // [B, Hq, splits, D + 2]: unnormalized acc, max, sum; used when splits > 1
};

template <int kD, bool kPaged>
__device__ __forceinline__ int64_t kv_offset(const DecodeParams& p, int b, int h, int64_t t) {
  if constexpr (kPaged) {
    const int64_t page = p.page_table[b * p.table_stride + t / p.page_size];
    return ((page * p.page_size + t % p.page_size) * p.hkv + h) * kD;
  } else {
    return ((int64_t(b) * p.hkv + h) * p.s_max + t) * kD;
  }
}

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

  const int64_t length = p.lengths[b];
  const int64_t per_split = (length + p.splits - 1) / p.splits;
  const int64_t begin = min(length, per_split * split), end = min(length, begin + per_split);

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
  // Thread i of the block finishes element i of each head's output (kD <= 256 threads' worth).
  for (int e = threadIdx.x; e < heads * kD; e += kWarps * 32) {
    const int g = e / kD, d = e % kD;
    float m_all = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_m[w][g]);
    float l_all = 0.0f, a_all = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      const float f = s_m[w][g] == -INFINITY ? 0.0f : expf(s_m[w][g] - m_all);
      l_all += s_l[w][g] * f;
      a_all += s_acc[w][g][d] * f;
    }
    const int head = first_head + g;
    if (p.splits == 1) {
      static_cast<T*>(p.out)[(int64_t(b) * p.hq + head) * kD + d] = from_float<T>(a_all / l_all);
    } else {
      float* part = p.partial + ((int64_t(b) * p.hq + head) * p.splits + split) * (kD + 2);
      part[d] = a_all;
      if (d == 0) part[kD] = m_all, part[kD + 1] = l_all;
    }
  }
}

// One block per (sequence, query head); thread d combines element d over the splits.
template <class T, int kD>
__global__ void decode_merge_kernel(DecodeParams p) {
  const int64_t row = blockIdx.x;  // b * Hq + head
  const float* part = p.partial + row * p.splits * (kD + 2);
  float m_all = -INFINITY;
  for (int s = 0; s < p.splits; ++s) m_all = fmaxf(m_all, part[s * (kD + 2) + kD]);
  for (int d = threadIdx.x; d < kD; d += blockDim.x) {
    float l_all = 0.0f, a_all = 0.0f;
    for (int s = 0; s < p.splits; ++s) {
      const float m_s = part[s * (kD + 2) + kD];
      const float f = m_s == -INFINITY ? 0.0f : expf(m_s - m_all);
      l_all += part[s * (kD + 2) + kD + 1] * f;
      a_all += part[s * (kD + 2) + d] * f;
    }
    static_cast<T*>(p.out)[row * kD + d] = from_float<T>(a_all / l_all);
  }
}

template <class T, int kD, bool kPaged>
cudaError_t launch_decode(DecodeParams p, int batch, int64_t capacity, cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  p.chunks = (p.group + kMaxHeadsPerBlock - 1) / kMaxHeadsPerBlock;
  // Enough blocks for eight per SM (memory parallelism), but no split shorter than 128 tokens.
  const int64_t blocks = int64_t(batch) * p.hkv * p.chunks;
  p.splits = int(std::clamp<int64_t>((8 * sms + blocks - 1) / blocks, 1, std::max<int64_t>(1, capacity / 128)));
  p.partial = nullptr;
  if (p.splits > 1) {
    const size_t bytes = size_t(batch) * p.hq * p.splits * (kD + 2) * sizeof(float);
    if (const cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&p.partial), bytes, stream); e != cudaSuccess) return e;
  }
  const dim3 grid(unsigned(p.splits), unsigned(p.hkv * p.chunks), unsigned(batch));
  decode_split_kernel<T, kD, kPaged><<<grid, kWarps * 32, 0, stream>>>(p);
  if (p.splits > 1) {
    decode_merge_kernel<T, kD><<<unsigned(batch * p.hq), kD, 0, stream>>>(p);
    cudaFreeAsync(p.partial, stream);
  }
  return cudaGetLastError();
}

// head_dim -> template; the supported set is stated once here and in supports().
template <class T, bool kPaged>
cudaError_t launch_for_head_dim(const DecodeParams& p, int d, int batch, int64_t capacity, cudaStream_t s) {
  switch (d) {
    case 64: return launch_decode<T, 64, kPaged>(p, batch, capacity, s);
    case 128: return launch_decode<T, 128, kPaged>(p, batch, capacity, s);
    default:
      if constexpr (sizeof(T) == 2) return launch_decode<T, 256, kPaged>(p, batch, capacity, s);
      return cudaErrorInvalidValue;
  }
}

template <bool kPaged, class Cache>
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
    check_launch(launch_for_head_dim<T, kPaged>(p, int(q.dim(3)), int(q.dim(0)), capacity, stream_of(stream)), op);
  });
}

}  // namespace

void decode_attention(const DecodeAttentionArgs& a) {
  run<false>(a.q, a.cache, a.out, a.options.scale, a.stream, "decode_attention");
}
void decode_attention_paged(const DecodeAttentionPagedArgs& a) {
  run<true>(a.q, a.cache, a.out, a.options.scale, a.stream, "decode_attention_paged");
}

}  // namespace decodelab::cuda
