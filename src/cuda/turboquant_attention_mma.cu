// Fused decode attention over the paged TurboQuant cache with scores and values on the tensor
// cores (backend cuda.mma): 4-bit K and V codes, head_dim 64, 128 or 256, f16 or bf16 q and out.
// The algebra and the four launches are turboquant_attention.cu's (its header comment): q' = R_K q
// once per query head, token t scores n_t s_t sum_j q'_j c_K[idx_tj], o' = sum_t p_t n_t s_t
// c_V[idx_t] in V's rotated domain, out = R_V^T o'. Only the split kernel differs.
//
// Why: on the CUDA cores a token costs about 2,000 thread-instructions at D = 128 and a GQA group
// of 4 (the centroid expansion plus 4 x 2 x 128 FMAs), which caps that kernel far below the
// memory rate of 68 + 68 bytes a token. Here each 4-bit code costs about 2.6 instructions to
// become an f16 centroid (byte permutes out of a 16-entry table held in registers), and the dot
// products are mma.sync m16n8k16 with f32 accumulation.
//
// The split kernel: a block per (sequence, KV head, split, chunk of <= 8 query heads), 4 warps,
// tiles of 128 tokens staged in shared memory by 4-byte cp.async (records are only 4-byte
// aligned), three tiles in flight (two at D = 256). Warp w takes tokens [32w, 32w + 32) of each
// tile and keeps its own running max, sum and accumulator (merged at the end of the block,
// finish_block). Lane = 4r + c. Per tile, a warp's 32 tokens:
//   scores  S^T[head, token] = Q'[head, :] K[token, :]^T, heads as the mma's M (rows 8-15 zero),
//           tokens as N (four tiles of 8: four independent mma chains), the head dim as K. The
//           dot product does not care which dimension sits in which k slot, so lane (r, c) takes
//           token r of each N tile and the
//           contiguous dimensions [c D/4, (c + 1) D/4) of it: D/32 code words, each expanding to
//           the B operands of two k steps; its A operands are the same dimensions of q'[head r],
//           packed to f16 once per block.
//   softmax S^T's accumulator layout (lane (r, c): head r, tokens 2c, 2c + 1 of each N tile) is the
//           B operand layout of the value product below, so the weights never leave registers.
//           The K factor n s of each token is found by the lanes that read its codes and passed
//           with shuffles; the V factor is folded into the weights (p n s, rounded to f16).
//   values  O'^T[dim, head] += V^T[dim, token] P^T[token, head]: dims as M, tokens as K (two steps
//           of 16), heads as N. Of each 16, lane (r, c) reads tokens 2c, 2c + 1, 2c + 8, 2c + 9
//           and, of each, the code byte (r D/16 + i) for M tile i: that byte's two dimensions are
//           the tile's rows r and r + 8.
//           Two expanded tokens make an A register with one byte permute.
// Shared-memory rows are padded so that these loads hit distinct banks (K rows D/8 words, D/8 + 4
// at D = 256; V rows D/8 + 4). Norm-corrected sides sum their expanded centroids' squares in f16
// pairs, four squares at a time, then in f32 (about 1e-4 relative, next to f16 operands' 5e-4).
// The f16 operands put the result at f16 level, not f32: this backend declines f32 q.
#include "cuda/mma.cuh"
#include "cuda/turboquant_attention.cuh"

namespace decodelab::cuda {
namespace {

using namespace turboquant;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 128;  // tokens per stage
constexpr int kWarpTokens = kTile / kWarps;

template <int kD>
struct Layout {
  static_assert(kD % 64 == 0, "a lane reads whole code words of K (D/32) and of V (D/64)");
  static constexpr int kCodeWords = kD / 8;  // 4-bit codes of one record
  static constexpr int kKRow = kD == 256 ? kCodeWords + 4 : kCodeWords;
  static constexpr int kVRow = kCodeWords + 4;
  static constexpr int kKWordsPerLane = kD / 32;
  static constexpr int kVWordsPerLane = kD / 64;
  // One stage: K code rows, V code rows, K norms, V norms (words).
  static constexpr int kStageWords = kTile * (kKRow + kVRow + 2);
  static constexpr int kStages = kD == 256 ? 2 : 3;
  static constexpr int kStageBytes = kStages * kStageWords * 4;
  // The end of the block reuses the stages for each warp's accumulator (finish_block).
  static constexpr int kFinishBytes = kWarps * kMaxHeadsPerBlock * kD * 4;
  static constexpr int kBytes = kStageBytes > kFinishBytes ? kStageBytes : kFinishBytes;
};

__device__ __forceinline__ uint32_t permute(uint32_t a, uint32_t b, uint32_t selector) {
  return __byte_perm(a, b, selector);
}

// A 16-entry f16 codebook as byte tables: lo[i] holds the low bytes of entries 4i..4i+3, hi[i]
// their high bytes.
struct Table16 {
  uint32_t lo[4], hi[4];
};

__device__ __forceinline__ Table16 make_table(const float (&centroids)[16]) {
  Table16 t{};
#pragma unroll
  for (int e = 0; e < 16; ++e) {
    const uint32_t bits = __half_as_ushort(__float2half_rn(centroids[e]));
    t.lo[e / 4] |= (bits & 0xFFu) << (8 * (e % 4));
    t.hi[e / 4] |= (bits >> 8) << (8 * (e % 4));
  }
  return t;
}

// The eight 4-bit codes of w (code k in bits [4k, 4k + 4)) as four f16 pairs: out[k] = (c[code
// 2k], c[code 2k + 1]). Per four codes: a byte permute picks each code's low byte out of entries
// 0-7 and another out of 8-15, a third keeps the one bit 3 of the code asks for; likewise the high
// bytes; two more interleave them into pairs.
__device__ __forceinline__ void expand8(uint32_t w, const Table16& t, uint32_t (&out)[4]) {
  const uint32_t entry = w & 0x77777777u;                            // code & 7 per nibble
  const uint32_t half = ((w >> 1) & 0x44444444u) | 0x32103210u;       // byte k from b: k + 4 * bit 3
#pragma unroll
  for (int part = 0; part < 2; ++part) {
    const uint32_t e = part == 0 ? entry : entry >> 16, h = part == 0 ? half : half >> 16;
    const uint32_t lo = permute(permute(t.lo[0], t.lo[1], e), permute(t.lo[2], t.lo[3], e), h);
    const uint32_t hi = permute(permute(t.hi[0], t.hi[1], e), permute(t.hi[2], t.hi[3], e), h);
    out[2 * part] = permute(lo, hi, 0x5140);
    out[2 * part + 1] = permute(lo, hi, 0x7362);
  }
}

// The sum of squares of four f16 pairs, in f32.
__device__ __forceinline__ float sum_squares(const uint32_t (&pairs)[4]) {
  const __half2* h = reinterpret_cast<const __half2*>(pairs);
  __half2 s = __hmul2(h[0], h[0]);
  s = __hfma2(h[1], h[1], s);
  s = __hfma2(h[2], h[2], s);
  s = __hfma2(h[3], h[3], s);
  const float2 f = __half22float2(s);
  return f.x + f.y;
}

// N consecutive words of shared memory in the widest loads their alignment allows (the rows and
// lane offsets of Layout keep 4-word groups 16-byte aligned, 2-word groups 8-byte aligned).
template <int N>
__device__ __forceinline__ void load_words(const uint32_t* p, uint32_t (&w)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N / 4; ++k) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[k];
      w[4 * k] = v.x, w[4 * k + 1] = v.y, w[4 * k + 2] = v.z, w[4 * k + 3] = v.w;
    }
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      const uint2 v = reinterpret_cast<const uint2*>(p)[k];
      w[2 * k] = v.x, w[2 * k + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) w[k] = p[k];
  }
}

template <int kD>
__global__ void __launch_bounds__(kThreads) split_kernel_mma(const __grid_constant__ TqParams tq, DecodeParams p) {
  using L = Layout<kD>;
  extern __shared__ __align__(16) uint32_t smem[];
  __shared__ int64_t rec_s[L::kStages][kTile];
  __shared__ float m_s[kWarps][kMaxHeadsPerBlock], l_s[kWarps][kMaxHeadsPerBlock];

  const auto [split, head_chunk] = block_coordinates();
  const int b = blockIdx.z, h = head_chunk / p.chunks, chunk = head_chunk % p.chunks;
  const int first_head = h * p.group + chunk * kMaxHeadsPerBlock;
  const int heads = min(kMaxHeadsPerBlock, p.group - chunk * kMaxHeadsPerBlock);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, r = lane / 4, c = lane % 4;

  // q'[head r], dimensions [c D/4, (c + 1) D/4), as f16 pairs in order; zero for absent heads.
  uint32_t q2[L::kKWordsPerLane][4];
  {
    const float* q = tq.q_rotated + (int64_t(b) * p.hq + first_head + r) * kD + c * (kD / 4);
#pragma unroll
    for (int j = 0; j < L::kKWordsPerLane; ++j) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 v = r < heads ? *reinterpret_cast<const float2*>(q + 8 * j + 2 * k) : float2{0.0f, 0.0f};
        q2[j][k] = pack2(v.x, v.y, __half{});
      }
    }
  }
  const Table16 k_table = make_table(tq.k.centroids), v_table = make_table(tq.v.centroids);

  int64_t begin, end;
  split_range<1>(p, b, split, begin, end);
  const int tiles = int((end - begin + kTile - 1) / kTile);
  const int32_t* table = p.page_table + int64_t(b) * p.table_stride;

  // A tile's records: thread t finds token t's byte offset in its pool (a page-table read) one
  // iteration before the block copies the tile, so that read's latency hides behind a tile of
  // compute rather than stalling the block at a barrier. rec_s[tile % kStages] holds the tile's
  // offsets from the end of iteration tile - kStages to the copy at iteration tile - kStages + 1.
  constexpr int kRecordBytes = 4 + kD / 2;
  auto find_record = [&](int tile) -> int64_t {
    const int64_t t = begin + int64_t(tile) * kTile + tid;
    if (tile >= tiles || t >= end) return 0;
    return ((int64_t(table[t / p.page_size]) * p.page_size + t % p.page_size) * p.hkv + h) * kRecordBytes;
  };
  // The block copies the tile's norms and code words, consecutive threads on consecutive words.
  auto copy_tile = [&](int tile) {
    uint32_t* stage = smem + (tile % L::kStages) * L::kStageWords;
    uint32_t* k_codes = stage;
    uint32_t* v_codes = k_codes + kTile * L::kKRow;
    uint32_t* norms = v_codes + kTile * L::kVRow;  // K norms [kTile], then V norms [kTile]
    const int count = int(min(int64_t(kTile), end - begin - int64_t(tile) * kTile));
    const int64_t* at = rec_s[tile % L::kStages];
    for (int i = tid; i < 2 * count; i += kThreads) {
      const bool key = i < count;
      const int t = key ? i : i - count;
      copy_async<4>(norms + (key ? 0 : kTile) + t, (key ? tq.k.pages : tq.v.pages) + at[t]);
    }
    // Thread tid copies word tid % kCodeWords of every (kThreads / kCodeWords)-th token.
    const int w = tid % L::kCodeWords;
    for (int t = tid / L::kCodeWords; t < count; t += kThreads / L::kCodeWords) {
      const int64_t from = at[t] + 4 + 4 * w;
      copy_async<4>(k_codes + t * L::kKRow + w, tq.k.pages + from);
      copy_async<4>(v_codes + t * L::kVRow + w, tq.v.pages + from);
    }
  };

  float m = -INFINITY, l = 0.0f;           // head r, this warp's tokens, log2 units
  float acc[kD / 16][4] = {};              // O'^T tile i: dims (rows r, r + 8), heads 2c, 2c + 1

#pragma unroll
  for (int s = 0; s < L::kStages; ++s) rec_s[s][tid] = find_record(s);
  __syncthreads();
#pragma unroll
  for (int s = 0; s < L::kStages - 1; ++s) {
    if (s < tiles) copy_tile(s);
    commit_copies();  // an empty group past the last tile keeps the count per iteration fixed
  }
  for (int tile = 0; tile < tiles; ++tile) {
    wait_copies<L::kStages - 2>();
    __syncthreads();  // this tile is in; every warp is done with the stage the next copy reuses
    if (tile + L::kStages - 1 < tiles) copy_tile(tile + L::kStages - 1);
    commit_copies();
    const int64_t next_record = find_record(tile + L::kStages);
    const uint32_t* k_codes = smem + (tile % L::kStages) * L::kStageWords;
    const uint32_t* v_codes = k_codes + kTile * L::kKRow;
    const float* k_norms = reinterpret_cast<const float*>(v_codes + kTile * L::kVRow);
    const float* v_norms = k_norms + kTile;
    const int count = int(min(int64_t(kTile), end - begin - int64_t(tile) * kTile));
    const int base = warp * kWarpTokens;  // this warp's 32 tokens: 4 N tiles of 8 for the scores
    if (base < count) {  // warp-uniform: some of this warp's tokens are in the tile

      // Scores of tokens base + 8n + (2c, 2c + 1) for head r. Lane (r, c) reads token base + 8n + r
      // of each N tile n; the four tiles' mma chains are independent, so they interleave.
      float s[4][4] = {};
      float k_factor[4];
      {
        uint32_t words[4][L::kKWordsPerLane];
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          load_words(k_codes + (base + 8 * n + r) * L::kKRow + c * L::kKWordsPerLane, words[n]);
        }
        float squares[4] = {};
#pragma unroll
        for (int j = 0; j < L::kKWordsPerLane; ++j) {
#pragma unroll
          for (int n = 0; n < 4; ++n) {
            uint32_t pairs[4];
            expand8(words[n][j], k_table, pairs);
            if (tq.k.norm_corrected) squares[n] += sum_squares(pairs);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const uint32_t a[4] = {q2[j][2 * half], 0u, q2[j][2 * half + 1], 0u};
              const uint32_t bk[2] = {pairs[2 * half], pairs[2 * half + 1]};
              mma_16816(s[n], a, bk, __half{});
            }
          }
        }
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          k_factor[n] = k_norms[base + 8 * n + r];
          if (tq.k.norm_corrected) {
            squares[n] += __shfl_xor_sync(0xffffffffu, squares[n], 1);
            squares[n] += __shfl_xor_sync(0xffffffffu, squares[n], 2);
            k_factor[n] /= sqrtf(squares[n]);
          }
        }
      }
      // Token base + 8n + 2c + e's factor is lane 4 (2c + e)'s k_factor[n].
      float score[4][2];
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < 4; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float f = __shfl_sync(0xffffffffu, k_factor[n], 4 * (2 * c + e));
          const bool valid = base + 8 * n + 2 * c + e < count;
          score[n][e] = valid ? s[n][e] * f : -INFINITY;
          tile_max = fmaxf(tile_max, score[n][e]);
        }
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float m_new = fmaxf(m, tile_max);  // finite: token base is valid
      const float rescale = exp2f(m - m_new);  // 0 while m is -inf
      m = m_new;

      // V: for the 16 tokens of value step v (N tiles 2v, 2v + 1), tokens base + 16v + 2c + {0, 1,
      // 8, 9}, and of each this lane's code bytes [r D/16, (r + 1) D/16).
      float v_factor[2][4];
      uint32_t v_words[2][4][L::kVWordsPerLane];
#pragma unroll
      for (int v = 0; v < 2; ++v) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int t = base + 16 * v + 2 * c + (k % 2) + 8 * (k / 2);
          v_factor[v][k] = v_norms[t];
          load_words(v_codes + t * L::kVRow + r * L::kVWordsPerLane, v_words[v][k]);
          if (tq.v.norm_corrected) {
            float squares = 0.0f;
#pragma unroll
            for (int u = 0; u < L::kVWordsPerLane; ++u) {
              uint32_t pairs[4];
              expand8(v_words[v][k][u], v_table, pairs);
              squares += sum_squares(pairs);
            }
            squares += __shfl_xor_sync(0xffffffffu, squares, 4);
            squares += __shfl_xor_sync(0xffffffffu, squares, 8);
            squares += __shfl_xor_sync(0xffffffffu, squares, 16);
            v_factor[v][k] /= sqrtf(squares);
          }
        }
      }
      // P^T as the B operand of value step v: tokens 2c, 2c + 1 (b0) and 2c + 8, 2c + 9 (b1).
      uint32_t pb[2][2];
      float sum = 0.0f;
#pragma unroll
      for (int v = 0; v < 2; ++v) {
        float weight[2][2];
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const bool valid = base + 16 * v + 8 * n + 2 * c + e < count;
            const float w = valid ? exp2f(score[2 * v + n][e] - m_new) : 0.0f;
            sum += w;
            weight[n][e] = valid ? w * v_factor[v][2 * n + e] : 0.0f;  // a stale norm may be NaN
          }
        }
        pb[v][0] = pack2(weight[0][0], weight[0][1], __half{});
        pb[v][1] = pack2(weight[1][0], weight[1][1], __half{});
      }
      l = l * rescale + sum;
      // The accumulator columns are heads 2c and 2c + 1: their rescales live on lanes 8c, 8c + 4.
      const float rescale0 = __shfl_sync(0xffffffffu, rescale, 8 * c);
      const float rescale1 = __shfl_sync(0xffffffffu, rescale, 8 * c + 4);
#pragma unroll
      for (int i = 0; i < kD / 16; ++i) {
        acc[i][0] *= rescale0, acc[i][1] *= rescale1, acc[i][2] *= rescale0, acc[i][3] *= rescale1;
      }
#pragma unroll
      for (int u = 0; u < L::kVWordsPerLane; ++u) {
#pragma unroll
        for (int v = 0; v < 2; ++v) {
          uint32_t pairs[4][4];  // [token k][M tile 4u + j]: (row r, row r + 8) of that token
#pragma unroll
          for (int k = 0; k < 4; ++k) expand8(v_words[v][k][u], v_table, pairs[k]);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t a[4] = {
                permute(pairs[0][j], pairs[1][j], 0x5410), permute(pairs[0][j], pairs[1][j], 0x7632),
                permute(pairs[2][j], pairs[3][j], 0x5410), permute(pairs[2][j], pairs[3][j], 0x7632)};
            mma_16816(acc[4 * u + j], a, pb[v], __half{});
          }
        }
      }
    }
    rec_s[tile % L::kStages][tid] = next_record;  // tile + kStages's offsets, for its copy
  }

  // The warp's partials into shared memory (the stages are free once every warp is past here).
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  wait_copies<0>();
  __syncthreads();
  auto& acc_s = *reinterpret_cast<float(*)[kWarps][kMaxHeadsPerBlock][kD]>(smem);
#pragma unroll
  for (int i = 0; i < kD / 16; ++i) {
    // M tile i's rows r and r + 8 are the two dimensions of code byte r D/16 + i.
    const int d = 2 * (r * (kD / 16) + i);
    acc_s[warp][2 * c][d] = acc[i][0];
    acc_s[warp][2 * c + 1][d] = acc[i][1];
    acc_s[warp][2 * c][d + 1] = acc[i][2];
    acc_s[warp][2 * c + 1][d + 1] = acc[i][3];
  }
  if (c == 0) m_s[warp][r] = m / kLog2e, l_s[warp][r] = l;  // finish_block's max is in ln units
  __syncthreads();
  finish_block<float, kD, kWarps>(p, b, first_head, heads, split, acc_s, m_s, l_s);
}

}  // namespace

void turboquant_decode_attention_paged_mma(const TurboQuantDecodeAttentionPagedArgs& a) {
  const cudaStream_t stream = stream_of(a.stream);
  const cudaError_t status = dispatch_activation(a.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // declined in supports()
    } else {
      return with_one_of<64, 128, 256>(a.q.dim(2), [&](auto d) {
        constexpr int kD = decltype(d)::value;
        return launch_turboquant_attention<T, kD, split_kernel_mma<kD>, kThreads, Layout<kD>::kBytes, kTile>(a, stream);
      });
    }
  });
  check_launch(status, "turboquant_decode_attention_paged");
}

}  // namespace decodelab::cuda
