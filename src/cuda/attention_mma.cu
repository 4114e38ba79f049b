// The stable CUDA decode attention for f16 and bf16 caches, contiguous and paged: both products on
// the tensor cores (mma.sync m16n8k16, f16 or bf16 operands, f32 accumulation).
//
// Why: the CUDA-core kernels spend about 60 instructions per (token, KV head) on dot products,
// shuffles and a per-token softmax update, which is more than a memory-bound kernel can hide. Here
// a warp takes 16 tokens per step and
//   1. scores them against its block's query heads with 2 x D/16 mma: S^T = K Q^T, where the 16
//      rows of the A operand are the query heads (those past the group are zero) and the 8 columns
//      of each B tile are 8 tokens;
//   2. updates an online softmax once per step (max over the step, one rescale);
//   3. adds P V with D/16 mma: O^T = V^T P^T, whose B operand (P^T, 16 tokens x 8 heads) is exactly
//      the C fragment of step 1 packed to 16 bits, so the weights never leave registers.
// The reduction index of a product may be permuted freely as long as both operands use the same
// permutation, and the output rows of the second product may be permuted if the final store undoes
// it. Both are used so that every K and V load is a plain 16-byte load of 8 consecutive elements:
//   - scores: lane (g, c) = (lane / 4, lane % 4) loads 16-byte chunk 4i + c of token g of each
//     8-token tile; the chunk's halves serve k-steps 2i and 2i + 1. The query fragments use the same
//     mapping, loaded once.
//   - values: lane (g, c) loads tokens 2c, 2c + 1, 2c + 8, 2c + 9 of the step, chunks 8g + 64k
//     (8 dims each); a byte permute pairs the same dim of two tokens, which is what the A operand
//     of V^T wants. Output row g of m-tile 4k + w is dim 64k + 8g + 2w, row g + 8 is the dim after.
// Up to 8 query heads per block (the B operand of P V has 8 columns); larger groups use several
// blocks, as in the other kernels.
// A warp's next step is loaded while it computes the current one (head_dim up to 128), and the
// page of the step after that is read from the page table one step ahead.
#include "cuda/decode_attention.cuh"
#include "cuda/mma.cuh"

namespace decodelab::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kStep = 16;  // tokens per warp step: two 8-token tiles

__device__ __forceinline__ uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

template <class T, int kD, bool kPaged>
__global__ void __launch_bounds__(kWarps * 32) decode_mma_kernel(DecodeParams p) {
  constexpr int kKChunks = kD / 32;  // 16-byte K chunks per lane per token (4 lanes per token)
  constexpr int kVChunks = kD / 64;  // 16-byte V chunks per lane per token (8 lanes per token)
  constexpr int kMTiles = kD / 16;   // P V tiles of 16 output dims
  constexpr float kLog2e = 1.4426950408889634f;
  const int split = blockIdx.x, b = blockIdx.z;
  const int h = blockIdx.y / p.chunks, chunk = blockIdx.y % p.chunks;
  const int first_head = h * p.group + chunk * kMaxHeadsPerBlock;
  const int heads = min(kMaxHeadsPerBlock, p.group - chunk * kMaxHeadsPerBlock);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, c = lane % 4;
  const T zero_t{};
  const uint4 zero{0, 0, 0, 0};

  int64_t begin, end;
  split_range<kWarps * kStep>(p, b, split, begin, end);
  const float score_scale = p.scale * kLog2e;
  const uint4* k = static_cast<const uint4*>(p.k);
  const uint4* v = static_cast<const uint4*>(p.v);
  constexpr int64_t kStride = kWarps * kStep;  // a warp's steps start kStride tokens apart

  // With pages of a multiple of kStep tokens a step lies in one page (steps start at multiples of
  // kStep): one page-table read per step instead of one per token, and it is read one step ahead,
  // so that a step's K/V loads never wait for the page table.
  const bool whole_pages = kPaged && p.page_size % kStep == 0;
  const int32_t* table = kPaged ? p.page_table + b * p.table_stride : nullptr;
  int64_t next_base = begin + warp * kStep;  // the first token of the next step to load
  int32_t next_page = whole_pages && next_base < end ? __ldg(table + next_base / p.page_size) : 0;
  // One step's loads: lane (g, c)'s K chunks of tokens g and 8 + g, and its V chunks of tokens
  // 2c, 2c + 1, 2c + 8, 2c + 9 (see the top of the file).
  struct StepLoads {
    uint4 kr[2][kKChunks], vr[4][kVChunks];
  };
  // The warp's next step into `s`; every load is issued before any is used.
  const auto load = [&](StepLoads& s) {
    const int64_t base = next_base;
    int64_t page_row = 0;  // the step's page, as a token row of the pool
    if (whole_pages) {
      page_row = int64_t(next_page) * p.page_size - base / p.page_size * p.page_size;
      next_page = base + kStride < end ? __ldg(table + (base + kStride) / p.page_size) : 0;
    }
    next_base += kStride;
    const auto row_of = [&](int64_t t) {  // element offset of token t's row / 8
      if (whole_pages) return ((page_row + t) * p.hkv + h) * kD / 8;
      return kv_offset<kD, kPaged>(p, b, h, t) / 8;
    };
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t t = base + 8 * j + g;
      const int64_t at = t < end ? row_of(t) : 0;
#pragma unroll
      for (int i = 0; i < kKChunks; ++i) s.kr[j][i] = t < end ? __ldcs(k + at + 4 * i + c) : zero;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t t = base + 8 * (u / 2) + 2 * c + u % 2;
      const int64_t at = t < end ? row_of(t) : 0;
#pragma unroll
      for (int kk = 0; kk < kVChunks; ++kk) s.vr[u][kk] = t < end ? __ldcs(v + at + 8 * kk + g) : zero;
    }
  };
  // Pipelined (kD <= 128): the next step's loads are in flight while a step is computed, two
  // steps' K/V in registers (about 235 registers, two blocks an SM). On the H200 this took B = 1,
  // L = 128k from 156 to 146 us and B = 32, L = 4k from 149 to 137 us (docs/perf/NOTES.md). At
  // kD = 256 two steps do not fit in registers: one step at a time.
  constexpr bool kPipelined = kD <= 128;
  StepLoads buffers[kPipelined ? 2 : 1];
  if (kPipelined && next_base < end) load(buffers[0]);

  // Query fragments of head g (zero past the block's heads): chunk 4i + c, as the K loads.
  const uint4* q = static_cast<const uint4*>(p.q);
  uint4 qf[kKChunks];
#pragma unroll
  for (int i = 0; i < kKChunks; ++i) {
    qf[i] = g < heads ? __ldg(q + ((int64_t(b) * p.hq + first_head + g) * kD) / 8 + 4 * i + c) : zero;
  }

  float m = -INFINITY;  // head g's running max (log2 units), the same on its four lanes
  float l = 0.0f;       // this lane's share of head g's running sum
  float o[kMTiles][4] = {};
  // One step of tokens [base, base + kStep) from its loads.
  const auto compute = [&](const StepLoads& s, int64_t base) {
    // 1. Scores: sc[j][e] is head g against token base + 8j + 2c + e (rows g + 8 are unused).
    float sc[2][4] = {};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int i = 0; i < kKChunks; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const uint32_t a[4] = {word(qf[i], 2 * half), 0u, word(qf[i], 2 * half + 1), 0u};
          const uint32_t bk[2] = {word(s.kr[j][i], 2 * half), word(s.kr[j][i], 2 * half + 1)};
          mma_16816(sc[j], a, bk, zero_t);
        }
      }
    }

    // 2. Online softmax, once per step. Tokens past the end and heads past the block's score -inf;
    // a head with no score yet keeps m = -inf and gets zero weights.
    float step_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool valid = g < heads && base + 8 * j + 2 * c + e < end;
        sc[j][e] = valid ? sc[j][e] * score_scale : -INFINITY;
        step_max = fmaxf(step_max, sc[j][e]);
      }
    }
    step_max = fmaxf(step_max, __shfl_xor_sync(0xffffffffu, step_max, 1));
    step_max = fmaxf(step_max, __shfl_xor_sync(0xffffffffu, step_max, 2));
    const float m_new = fmaxf(m, step_max);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float correction = exp2f(m - m_use);
    float p_w[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) p_w[j][e] = exp2f(sc[j][e] - m_use);
    }
    l = l * correction + (p_w[0][0] + p_w[0][1]) + (p_w[1][0] + p_w[1][1]);
    m = m_new;

    // 3. Values. This lane's outputs are heads 2c and 2c + 1, whose corrections live on lanes 8c
    // and 8c + 4.
    const float corr_a = __shfl_sync(0xffffffffu, correction, 8 * c);
    const float corr_b = __shfl_sync(0xffffffffu, correction, 8 * c + 4);
    const uint32_t pb[2] = {pack2(p_w[0][0], p_w[0][1], zero_t), pack2(p_w[1][0], p_w[1][1], zero_t)};
#pragma unroll
    for (int kk = 0; kk < kVChunks; ++kk) {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        float(&acc)[4] = o[4 * kk + w];
        acc[0] *= corr_a, acc[1] *= corr_b, acc[2] *= corr_a, acc[3] *= corr_b;
        const uint32_t x0 = word(s.vr[0][kk], w), x1 = word(s.vr[1][kk], w);
        const uint32_t x2 = word(s.vr[2][kk], w), x3 = word(s.vr[3][kk], w);
        const uint32_t a[4] = {__byte_perm(x0, x1, 0x5410), __byte_perm(x0, x1, 0x7632), __byte_perm(x2, x3, 0x5410),
                               __byte_perm(x2, x3, 0x7632)};
        mma_16816(acc, a, pb, zero_t);
      }
    }
  };

  const int64_t first = begin + warp * kStep;
  if constexpr (kPipelined) {
    // Two steps per iteration, so that the buffers swap roles without copies.
    for (int64_t base = first; base < end; base += 2 * kStride) {
      if (base + kStride < end) load(buffers[1]);
      compute(buffers[0], base);
      if (base + kStride >= end) break;
      if (base + 2 * kStride < end) load(buffers[0]);
      compute(buffers[1], base + kStride);
    }
  } else {
    for (int64_t base = first; base < end; base += kStride) {
      load(buffers[0]);
      compute(buffers[0], base);
    }
  }

  // The warp's state per head into shared memory, then the block's warps are merged.
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  __shared__ float s_acc[kWarps][kMaxHeadsPerBlock][kD];
  __shared__ float s_m[kWarps][kMaxHeadsPerBlock], s_l[kWarps][kMaxHeadsPerBlock];
  if (c == 0) s_m[warp][g] = m / kLog2e, s_l[warp][g] = l;  // ln units, as the merge expects
#pragma unroll
  for (int kk = 0; kk < kVChunks; ++kk) {
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int dim = 64 * kk + 8 * g + 2 * w;
      const float(&acc)[4] = o[4 * kk + w];
      s_acc[warp][2 * c][dim] = acc[0], s_acc[warp][2 * c + 1][dim] = acc[1];
      s_acc[warp][2 * c][dim + 1] = acc[2], s_acc[warp][2 * c + 1][dim + 1] = acc[3];
    }
  }
  __syncthreads();
  finish_block<T, kD, kWarps>(p, b, first_head, heads, split, s_acc, s_m, s_l);
}

}  // namespace

template <class T, int kD, bool kPaged>
cudaError_t launch_decode_mma(DecodeParams p, int batch, int64_t capacity, cudaStream_t stream) {
  constexpr auto kernel = decode_mma_kernel<T, kD, kPaged>;
  p.splits = choose_splits(p, batch, capacity, resident_blocks<kernel>(kWarps * 32, 0), kWarps * kStep);
  return launch_split_merge<T, kD>(p, batch, stream, [&](dim3 grid, const DecodeParams& params) {
    kernel<<<grid, kWarps * 32, 0, stream>>>(params);
  });
}

#define DECODELAB_MMA_INSTANCES(T)                                                                   \
  template cudaError_t launch_decode_mma<T, 64, false>(DecodeParams, int, int64_t, cudaStream_t);   \
  template cudaError_t launch_decode_mma<T, 64, true>(DecodeParams, int, int64_t, cudaStream_t);    \
  template cudaError_t launch_decode_mma<T, 128, false>(DecodeParams, int, int64_t, cudaStream_t);  \
  template cudaError_t launch_decode_mma<T, 128, true>(DecodeParams, int, int64_t, cudaStream_t);   \
  template cudaError_t launch_decode_mma<T, 256, false>(DecodeParams, int, int64_t, cudaStream_t);  \
  template cudaError_t launch_decode_mma<T, 256, true>(DecodeParams, int, int64_t, cudaStream_t);
DECODELAB_MMA_INSTANCES(__half)
DECODELAB_MMA_INSTANCES(__nv_bfloat16)

}  // namespace decodelab::cuda
