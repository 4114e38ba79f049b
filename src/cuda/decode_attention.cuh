// What the CUDA decode-attention kernels (attention.cu, attention_mma.cu) share: their parameters,
// the split of a sequence's length across blocks, the last step of a block (merging its warps'
// softmax states) and the log-sum-exp merge of the splits.
//
// Every kernel has the same plan: a block owns one (sequence, KV head, split of the length) and up
// to kMaxHeadsPerBlock query heads of that KV head's GQA group, so K/V are read once per group.
// Splits give batch 1 enough blocks to fill the GPU; a second kernel merges them in a fixed order,
// so results are bit-identical run to run.
#pragma once

#include <algorithm>
#include <atomic>

#include "cuda/common.cuh"

namespace decodelab::cuda {

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
  float* partial;  // [B, Hq, splits, D + 2]: unnormalized acc, max (ln units), sum; when splits > 1
};

// Element offset of token t's row for KV head h of sequence b.
template <int kD, bool kPaged>
__device__ __forceinline__ int64_t kv_offset(const DecodeParams& p, int b, int h, int64_t t) {
  if constexpr (kPaged) {
    const int64_t page = p.page_table[b * p.table_stride + t / p.page_size];
    return ((page * p.page_size + t % p.page_size) * p.hkv + h) * kD;
  } else {
    return ((int64_t(b) * p.hkv + h) * p.s_max + t) * kD;
  }
}

// The tokens [begin, end) of a split: equal shares of the length, rounded up to `align` tokens (the
// kernel's step, or a runtime unit such as KIVI's key block), so that only a split's last step is
// partial.
__device__ __forceinline__ void split_range(const DecodeParams& p, int b, int split, int64_t align, int64_t& begin,
                                            int64_t& end) {
  const int64_t length = p.lengths[b];
  const int64_t share = (length + p.splits - 1) / p.splits;
  const int64_t per_split = (share + align - 1) / align * align;
  begin = min(length, per_split * split);
  end = min(length, begin + per_split);
}
template <int kAlign>
__device__ __forceinline__ void split_range(const DecodeParams& p, int b, int split, int64_t& begin, int64_t& end) {
  split_range(p, b, split, kAlign, begin, end);
}

// The end of a block: each of its kWarps warps left, per head g, its running max (ln units), sum
// and unnormalized accumulator in shared memory; thread i finishes element i of each head, into the
// output (one split) or the split's partial.
template <class T, int kD, int kWarps>
__device__ void finish_block(const DecodeParams& p, int b, int first_head, int heads, int split,
                             const float (&s_acc)[kWarps][kMaxHeadsPerBlock][kD],
                             const float (&s_m)[kWarps][kMaxHeadsPerBlock], const float (&s_l)[kWarps][kMaxHeadsPerBlock]) {
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

// Most splits of one sequence (the merge keeps a weight per split in shared memory).
constexpr int kMaxSplits = 1024;

// The merge: one block of kD threads per (sequence, query head). The split maxima and sums are
// reduced once, by the whole block, into a weight per split (exp(m_s - m_all)); then thread d adds
// element d of the splits' accumulators, several loads in flight. Fixed orders throughout, so the
// result is the same run to run.
template <class T, int kD>
__global__ void __launch_bounds__(kD) decode_merge_kernel(DecodeParams p) {
  constexpr int kWarps = kD / 32;
  __shared__ float s_weight[kMaxSplits];
  __shared__ float s_reduce[kWarps];
  const int64_t row = blockIdx.x;  // b * Hq + head
  const float* part = p.partial + row * p.splits * (kD + 2);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const auto block_reduce = [&](float v, auto op) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    if (lane == 0) s_reduce[warp] = v;
    __syncthreads();
    float all = s_reduce[0];
    for (int w = 1; w < kWarps; ++w) all = op(all, s_reduce[w]);
    __syncthreads();  // s_reduce is reused by the next reduction
    return all;
  };
  float m_local = -INFINITY;
  for (int s = tid; s < p.splits; s += kD) m_local = fmaxf(m_local, part[s * (kD + 2) + kD]);
  const float m_all = block_reduce(m_local, [](float a, float b) { return fmaxf(a, b); });
  float l_local = 0.0f;
  for (int s = tid; s < p.splits; s += kD) {
    const float m_s = part[s * (kD + 2) + kD];
    const float w = m_s == -INFINITY ? 0.0f : expf(m_s - m_all);  // an empty split weighs nothing
    s_weight[s] = w;
    l_local += part[s * (kD + 2) + kD + 1] * w;
  }
  const float l_all = block_reduce(l_local, [](float a, float b) { return a + b; });  // also orders s_weight
  float acc = 0.0f;
#pragma unroll 8
  for (int s = 0; s < p.splits; ++s) acc += s_weight[s] * part[s * (kD + 2) + tid];
  static_cast<T*>(p.out)[row * kD + tid] = from_float<T>(acc / l_all);
}

// Splits of the length for a grid of batch x Hkv x chunks blocks, when blocks_per_sm blocks fit on
// an SM at once: the fewest splits whose waves of blocks fill at least 90% of the GPU's block slots
// (a last wave of a few blocks leaves most of the GPU idle), none shorter than min_split tokens.
inline int choose_splits(const DecodeParams& p, int batch, int64_t capacity, int blocks_per_sm, int64_t min_split) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t slots = int64_t(std::max(1, blocks_per_sm)) * sms, blocks = int64_t(batch) * p.hkv * p.chunks;
  const int64_t most = std::clamp<int64_t>(capacity / min_split, 1, std::min<int64_t>(slots, kMaxSplits));
  int64_t best = 1;
  double best_fill = 0.0;
  for (int64_t s = 1; s <= most; ++s) {
    const int64_t total = blocks * s, waves = (total + slots - 1) / slots;
    const double fill = double(total) / double(waves * slots);
    if (fill >= 0.9) return int(s);
    if (fill > best_fill) best = s, best_fill = fill;
  }
  return int(best);
}

// How many blocks of a kernel fit on an SM at once (registers and shared memory), asked once.
template <auto kKernel>
int resident_blocks(int threads, int dynamic_smem) {
  static const int blocks = [&] {
    int n = 0;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, threads, size_t(dynamic_smem)) == cudaSuccess ? n : 1;
  }();
  return blocks;
}

// Runs the split kernel (grid: splits x (Hkv * chunks) x B) and, with several splits, the merge;
// the partials live in scratch memory for the two launches.
template <class T, int kD, class Launch>
cudaError_t launch_split_merge(DecodeParams p, int batch, cudaStream_t stream, Launch&& launch_split) {
  p.partial = nullptr;
  if (p.splits > 1) {
    const size_t bytes = size_t(batch) * p.hq * p.splits * (kD + 2) * sizeof(float);
    if (const cudaError_t e = scratch_alloc(reinterpret_cast<void**>(&p.partial), bytes, stream); e != cudaSuccess) return e;
  }
  const dim3 grid(unsigned(p.splits), unsigned(p.hkv * p.chunks), unsigned(batch));
  launch_split(grid, p);
  if (p.splits > 1) {
    decode_merge_kernel<T, kD><<<unsigned(batch * p.hq), kD, 0, stream>>>(p);
    if (const cudaError_t e = scratch_free(p.partial, stream); e != cudaSuccess) return e;
  }
  return cudaGetLastError();
}

// attention_mma.cu: tensor-core scores and values, f16 and bf16, head_dim 64/128/256.
template <class T, int kD, bool kPaged>
cudaError_t launch_decode_mma(DecodeParams p, int batch, int64_t capacity, cudaStream_t stream);

}  // namespace decodelab::cuda
