// cuda.codes: the batch-1 decode matvecs over MLX affine 4-bit weights (group 64) with f16
// activations, on the tensor cores with the raw codes as the A operand, for matvec, matvec_multi,
// output_projection and mlp_block as in matvec.cu.
//
// Why: cuda.mma turns every two codes into scaled f16 weights (a LOP3, a subtraction and a
// multiply-add) and builds its B operand from x with byte permutes per unit, about 2.5
// instructions per code, and reads x from L2 in its inner loop (docs/perf/NOTES.md). Here:
// - A code goes into the mma as it lies under a magic exponent: (w & 0x000F000F) | 1024.0 gives the
//   pair (1024 + q0, 1024 + q4) and (w & 0x00F000F0) | 64.0 the pair (64 + q1, 64 + q5) (the unit in
//   the last place of 64.0 is 1/16, so the nibble at bits 4..7 counts q), five instructions per
//   eight codes. The magic and the group's scale and bias come back after the mma, in f32:
//   sum_k (s q_k + b) x_k = s (C - 1024 F1 - 64 F2) + b (F1 + F2), where C is the mma's sum and F1,
//   F2 are the sums of x over the inputs that sat under 1024.0 and under 64.0.
// - F1 and F2 are the same for every row: the block sums them per group once, as it lays out x.
// - At batch 1 seven of the mma's eight columns would be idle, so column n holds group n of the
//   step instead: lane (g, t) supplies B only in the mma of group g (zeros elsewhere), and the C
//   fragment then holds each row's sums for eight groups, so one scale epilogue serves eight groups.
// - x is laid out once per block in shared memory in the order the pairs come out, so B is one
//   shared-memory load per word, off the global memory path.
//
// Layout of the work: a block owns a tile of 16 rows of one job; its 8 warps split each row into
// eight contiguous runs of groups (warp w the w-th eighth). Lane (g, t) loads 8 bytes (words 2t and
// 2t + 1) of each group for rows g and g + 8, so a warp's step reads 128 contiguous bytes of a row,
// and a span's eight scales of a row are 16 contiguous bytes. (Warps taking groups in turn, w,
// w + 8, ..., made every lane's 2-byte scale load a sector of its own: ncu counted 57% of the
// kernel's L2 sectors as excess, more than the codes' own.) A warp's loads come in
// steps of a few groups, and the next step's are issued before this one is multiplied: with one
// step at a time every warp of the GPU waited out HBM's latency together, then computed while HBM
// idled (the first version of this kernel: no faster than cuda.mma).

#include "cuda/cuda.h"
#include "cuda/matvec_mma.cuh"

namespace decodelab::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kGroup = 64;  // inputs of an MLX group (supports() admits only 64)
constexpr int kMinBlocks = 2;

using Mlx4 = MlxMatrix<4, __half>;

// The codes at bits [0, 4) and [16, 20) of w as (1024 + q0, 1024 + q1), and those at [4, 8) and
// [20, 24) as (64 + q0, 64 + q1): one LOP3 each.
// (Written as C++, (w & mask) | magic became two LOP3s, both constants being immediates; with the
// magic as a register operand of one lop3 it is one.)
template <uint32_t kMask>
__device__ __forceinline__ uint32_t masked_or(uint32_t w, uint32_t magic) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(w), "n"(kMask), "r"(magic));  // (a & b) | c
  return d;
}
__device__ __forceinline__ uint32_t low_nibbles(uint32_t w) { return masked_or<0x000F000Fu>(w, 0x64006400u); }
__device__ __forceinline__ uint32_t high_nibbles(uint32_t w) { return masked_or<0x00F000F0u>(w, 0x54005400u); }

// A span: the eight groups whose sums share one C fragment (column n = group n of the span), so
// one scale epilogue. A step: the groups of a span a warp loads in one go; the next step's loads are
// in flight while a step is multiplied.
constexpr int kSpanGroups = 8;
template <int kParts>
constexpr int kStepGroups = 4 / kParts;  // 8 or 16 8-byte loads a lane, one part or two

// Lane (g, t)'s codes of one step: words 2t and 2t + 1 of each of its groups in rows g and g + 8.
template <int kParts>
struct StepCodes {
  uint2 codes[kParts][kStepGroups<kParts>][2];
};
// The scales and biases of the span's groups of lane (g, t)'s C columns 2t and 2t + 1.
template <int kParts>
struct SpanSide {
  __half scale[kParts][2][2], bias[kParts][2][2];  // [part][row g, g + 8][column 2t + j]
};

// x's words w (inputs 8w..8w+7) into shared memory as the pairs (x_{8w+p}, x_{8w+p+4}),
// p = 0..3, and F1 and F2 of every group, by the block's first kThreads threads. Words are taken by
// consecutive threads, and a group's eight words by eight lanes of one warp: F1 and F2 of a group
// are a reduction over those lanes (words is a multiple of 64, so a warp's words are all in range
// or none). A thread's loads go out together, kBatch at a time: one at a time, K = 14336 cost
// seven L2 round trips in a row before the first multiply.
template <int kThreads>
__device__ __forceinline__ void lay_out_x(const __half* __restrict__ x, int64_t words, uint4* xs, float2* group_sums) {
  constexpr int kBatch = 8;
  for (int64_t w0 = threadIdx.x; w0 < words; w0 += kBatch * kThreads) {
    uint4 v[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int64_t w = w0 + i * kThreads;
      v[i] = w < words ? __ldg(reinterpret_cast<const uint4*>(x) + w) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int64_t w = w0 + i * kThreads;
      if (w >= words) break;
      xs[w] = make_uint4(__byte_perm(v[i].x, v[i].z, 0x5410), __byte_perm(v[i].x, v[i].z, 0x7632),
                         __byte_perm(v[i].y, v[i].w, 0x5410), __byte_perm(v[i].y, v[i].w, 0x7632));
      const float2 x01 = __half22float2(as_pair<__half>(v[i].x)), x23 = __half22float2(as_pair<__half>(v[i].y));
      const float2 x45 = __half22float2(as_pair<__half>(v[i].z)), x67 = __half22float2(as_pair<__half>(v[i].w));
      // The 1024.0 slots hold inputs 0, 4, 2, 6 of a word, the 64.0 slots 1, 5, 3, 7.
      float f1 = (x01.x + x45.x) + (x23.x + x67.x), f2 = (x01.y + x45.y) + (x23.y + x67.y);
#pragma unroll
      for (int offset = 1; offset < 8; offset *= 2) {
        f1 += __shfl_xor_sync(0xFFFFFFFFu, f1, offset);
        f2 += __shfl_xor_sync(0xFFFFFFFFu, f2, offset);
      }
      if (w % 8 == 0) group_sums[w / 8] = make_float2(f1, f2);
    }
  }
}

template <int kParts>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) matvec_codes_kernel(Jobs<Mlx4, __half> jobs,
                                                                               const __half* __restrict__ x, int64_t k) {
  constexpr int kGroups = kStepGroups<kParts>, kStepsPerSpan = kSpanGroups / kGroups;
  // x's words w (inputs 8w..8w+7) as the pairs (x_{8w+p}, x_{8w+p+4}), p = 0..3, then a zero word.
  extern __shared__ uint4 xs[];
  __shared__ float partial[kWarps][kParts][kTileRows];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;

  int job;
  int64_t row0, n;
  find_tile<kParts>(jobs, blockIdx.x, job, row0, n);
  // Rows past the matrix repeat its last row: read, never stored.
  const int64_t rows[2] = {row0 + g < n ? row0 + g : n - 1, row0 + g + 8 < n ? row0 + g + 8 : n - 1};
  const int64_t words = k / 8, groups = k / kGroup;
  const int warp_groups = int(groups / kWarps);  // the warp's groups: from warp * warp_groups on
  const int steps = (warp_groups + kGroups - 1) / kGroups;
  const JobFormats<Mlx4, __half> m{jobs, job};
  // The warp's group q is group warp * warp_groups + q of the row. Per-lane bases, so that a group's loads are
  // a base plus a multiple of q (no 64-bit arithmetic per load).
  const uint2* code_base[kParts][2];
  const __half *scale_base[kParts][2], *bias_base[kParts][2];
#pragma unroll
  for (int p = 0; p < kParts; ++p) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      code_base[p][r] = reinterpret_cast<const uint2*>(m[p].packed + rows[r] * m[p].row_units) + warp * warp_groups * 4 + t;
      scale_base[p][r] = m[p].scales + rows[r] * m[p].row_groups + warp * warp_groups;
      bias_base[p][r] = m[p].biases + rows[r] * m[p].row_groups + warp * warp_groups;
    }
  }
  constexpr int kGroupCodes = 4, kGroupWords = 8;  // strides per q
  // F1 and F2 of every group (the sums of x under the 1024.0 and the 64.0 slots), after x's words.
  float2* const group_sums = reinterpret_cast<float2*>(xs + words + 1);

  const auto load_codes = [&](StepCodes<kParts>& s, int step) {
#pragma unroll
    for (int i = 0; i < kGroups; ++i) {
      const int q = step * kGroups + i;
#pragma unroll
      for (int p = 0; p < kParts; ++p) {
#pragma unroll
        for (int r = 0; r < 2; ++r) s.codes[p][i][r] = q < warp_groups ? __ldcs(code_base[p][r] + q * kGroupCodes) : make_uint2(0, 0);
      }
    }
  };
  const auto load_side = [&](SpanSide<kParts>& side, int span) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      // Columns past the warp's groups add nothing (epilogue): any group's scale will do.
      const int column = span * kSpanGroups + 2 * t + j, q = column < warp_groups ? column : warp_groups - 1;
#pragma unroll
      for (int p = 0; p < kParts; ++p) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          side.scale[p][r][j] = __ldg(scale_base[p][r] + q);
          side.bias[p][r][j] = __ldg(bias_base[p][r] + q);
        }
      }
    }
  };

  float c[kParts][2][4] = {};  // the span's sums, one chain per word of a group
  const int x_lane = warp * warp_groups * 8 + 2 * t;  // word 2t of the warp's group 0
  const auto multiply = [&](const StepCodes<kParts>& s, int step) {
#pragma unroll
    for (int i = 0; i < kGroups; ++i) {
      const int q = step * kGroups + i;
      const bool live = q % kSpanGroups == g && q < warp_groups;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint4 xw = xs[live ? x_lane + q * kGroupWords + j : int(words)];
        const uint32_t b_lo[2] = {xw.x, xw.y}, b_hi[2] = {xw.z, xw.w};
#pragma unroll
        for (int p = 0; p < kParts; ++p) {
          const uint32_t w0 = j == 0 ? s.codes[p][i][0].x : s.codes[p][i][0].y;
          const uint32_t w1 = j == 0 ? s.codes[p][i][1].x : s.codes[p][i][1].y;
          const uint32_t a_lo[4] = {low_nibbles(w0), low_nibbles(w1), high_nibbles(w0), high_nibbles(w1)};
          mma_16816(c[p][j], a_lo, b_lo, __half{});
          const uint32_t a_hi[4] = {low_nibbles(w0 >> 8), low_nibbles(w1 >> 8), high_nibbles(w0 >> 8),
                                    high_nibbles(w1 >> 8)};
          mma_16816(c[p][j], a_hi, b_hi, __half{});
        }
      }
    }
  };
  float y[kParts][2] = {};  // rows g and g + 8, over this lane's columns
  // C column 2t + j (group 8 span + 2t + j of the warp): row g in register j, row g + 8 in 2 + j.
  const auto epilogue = [&](const SpanSide<kParts>& side, int span) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int column = span * kSpanGroups + 2 * t + j;
      const float2 f = column < warp_groups ? group_sums[warp * warp_groups + column] : make_float2(0.0f, 0.0f);
      const float magic = fmaf(1024.0f, f.x, 64.0f * f.y), sum = f.x + f.y;
#pragma unroll
      for (int p = 0; p < kParts; ++p) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float codes = c[p][0][2 * r + j] + c[p][1][2 * r + j] - magic;
          y[p][r] = fmaf(__half2float(side.scale[p][r][j]), codes, fmaf(__half2float(side.bias[p][r][j]), sum, y[p][r]));
        }
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
#pragma unroll
      for (int p = 0; p < kParts; ++p) c[p][0][e] = c[p][1][e] = 0.0f;
    }
  };

  // Step `step` from `cur` while the next one lands in `next`; a span's scales are loaded once its
  // predecessor's epilogue is done with the buffer, a whole span ahead of their own epilogue.
  SpanSide<kParts> side;
  const auto advance = [&](int step, const StepCodes<kParts>& cur, StepCodes<kParts>& next) {
    if (step + 1 < steps) load_codes(next, step + 1);
    multiply(cur, step);
    if (step % kStepsPerSpan == kStepsPerSpan - 1 || step + 1 == steps) {
      epilogue(side, step / kStepsPerSpan);
      if (step + 1 < steps) load_side(side, (step + 1) / kStepsPerSpan);
    }
  };

  // The first step's loads go out before x is laid out, so the two overlap.
  StepCodes<kParts> buffers[2];
  load_codes(buffers[0], 0);
  load_side(side, 0);
  lay_out_x<kWarps * 32>(x, words, xs, group_sums);
  if (threadIdx.x == 0) xs[words] = make_uint4(0, 0, 0, 0);
  __syncthreads();
#pragma unroll 1
  for (int step = 0; step < steps; step += 2) {
    advance(step, buffers[0], buffers[1]);
    if (step + 1 < steps) advance(step + 1, buffers[1], buffers[0]);
  }

  // The four lanes of a row hold its sums over different groups: add them, then the warps'.
#pragma unroll
  for (int p = 0; p < kParts; ++p) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float v = y[p][r];
      v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
      v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
      if (t == 0) partial[warp][p][g + 8 * r] = v;
    }
  }
  __syncthreads();
  if (threadIdx.x >= kTileRows) return;
  const int64_t row = row0 + threadIdx.x;
  if (row >= n) return;
  float sum[kParts];
#pragma unroll
  for (int p = 0; p < kParts; ++p) {
    sum[p] = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum[p] += partial[w][p][threadIdx.x];
  }
  store_output<kParts>(jobs, job, n, 0, row, sum);
}

// Dynamic shared memory of a launch over K inputs: x's words, the zero word and the group sums.
constexpr int64_t codes_shared_bytes(int64_t k) {
  return (k / 8 + 1) * int64_t(sizeof(uint4)) + k / kGroup * int64_t(sizeof(float2));
}
static_assert(codes_shared_bytes(kCodesMaxK) <= (int64_t{227} << 10), "the largest K that supports() admits fits a block");

struct CodesMatvec {
  template <int kParts>
  static void run(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y, const Tensor* residual,
                  Stream stream, const char* op) {
    const auto make = [](const Weight& wi) { return mlx_matrix<4, __half>(wi); };
    const Jobs<Mlx4, __half> jobs = make_jobs<Mlx4, __half>(make, w, y, residual, kParts == 2);
    const int64_t k = x.dim(1);
    constexpr auto kernel = matvec_codes_kernel<kParts>;
    check_launch(allow_dynamic_smem<kernel>(int(codes_shared_bytes(kCodesMaxK))), op);
    kernel<<<tile_count<kParts>(jobs), kWarps * 32, size_t(codes_shared_bytes(k)), stream_of(stream)>>>(
        jobs, x.ptr<const __half>(), k);
    check_launch(cudaGetLastError(), op);
  }
};

}  // namespace

void matvec_codes(const MatvecArgs& a) { run_matvec<CodesMatvec>(a); }
void matvec_multi_codes(const MatvecMultiArgs& a) { run_matvec_multi<CodesMatvec>(a); }
void output_projection_codes(const OutputProjectionArgs& a) { run_output_projection<CodesMatvec>(a); }
void mlp_block_codes(const MlpBlockArgs& a) { run_mlp_block<CodesMatvec>(a); }

}  // namespace decodelab::cuda
