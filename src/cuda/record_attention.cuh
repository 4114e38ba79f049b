// The CUDA-core split kernel of the fused decode attention over paged record caches whose values
// are TurboQuant (MSE) records: TurboQuant keys (turboquant_attention.cu), RaBitQ keys
// (rabitq_attention.cu) and QJL keys (qjl_attention.cu). The key codes are a compile-time policy;
// everything else (the tiles, the copies, the softmax, the value sum in V's rotated domain, the
// split partials) is shared. The host side and the query/output rotations are
// turboquant_attention.cuh's.
//
// The algebra: with q' the query in the keys' domain (R_K q, or QJL's S q: kWidth floats, carrying
// scale * log2(e)), token t scores f_t sum_j q'_j e_K[t]_j, where e_K[t] is its record's expanded
// row and f_t its factor (the policy's); the softmax weights p_t sum o' = sum_t p_t n_t s_t c_V[idx_t]
// in V's rotated domain, and out = R_V^T o' (the launcher's last rotation).
//
// A block per (sequence, KV head, split of the length, chunk of <= 8 query heads of the GQA group),
// so each K and V record is read once per group. 128 threads, tiles of 128 tokens, two tiles in
// flight:
//   stage   the tile's K and V records are copied whole into shared memory with 4-byte cp.async,
//           consecutive threads taking consecutive words of a record (records are whole 4-byte
//           words: every policy's and TurboQuant's for the head_dims and splits taken), rows
//           padded to an odd number of words;
//   scores  thread t takes token t: per 32 coordinates of its key row (Keys::expand: one to four
//           words of its record) it adds them against every query head of the block (q' in shared
//           memory, the same address for the whole warp: a broadcast); an odd row stride puts the
//           32 lanes' words in 32 banks. The token's factor scales its scores; V's factor is found
//           here too when V is norm-corrected.
//   softmax a warp per head (as cuda.tiled): the tile's max, exp2 weights, the running max, sum and
//           the factor for the old accumulator; weights times V's factor for the value phase (the
//           sum l adds the plain weights).
//   values  each thread owns 8 coordinates (8 indices: `bits` bytes, `bits` + 1 in the wide part of
//           a split width) and a share of the tile's tokens, accumulating all heads of the block in
//           registers; token shares are added in a fixed order at the end.
// The block ends with its split's partial (o' unnormalized, max in ln units, sum), or with o' / l
// when there is one split. Every order is fixed, so results are the same bits run to run.
//
// kSplit: the kernel for split (fractional) TurboQuant widths, whose record sizes and index widths
// are runtime values: the records are copied a warp per record (lanes over its words: no runtime
// division), the value phase's index width is a per-thread value. Integer widths take the kernel
// without it, whose sizes and widths are compile-time (measured slower otherwise:
// docs/perf/NOTES.md, seventh session).
//
// A key policy Keys gives
//   Side                 what the kernel parameters carry for the keys (`pages` first);
//   kWidth, kWords       floats of q' per head (a multiple of 32), the 4-byte words of a record
//                        (with kSplit, the most it may have: the stage's row);
//   words(side)                           the words of this cache's records;
//   stage_table(side, table, tid)         fills the block's 32-float table (codebooks), or nothing;
//   expand(side, row, c, table, out, sq)  chunk c (coordinates [32c, 32c + 32)) of the key row of
//                                         the record `row` into out, adding their squares to sq;
//   factor(side, row, sq)                 the token's factor, sq the row's squared norm.
#pragma once

#include "cuda/turboquant_attention.cuh"

namespace decodelab::cuda::turboquant {

constexpr int kThreads = 128;
constexpr int kTile = kThreads;  // tokens per tile: one per thread in the score phase

// Shared memory of the split kernel, in 4-byte words.
// The words of a TurboQuant record at kBits bits for head_dim kD: the norm and the indices; with
// kSplit the most a split width may have (kBits < 4: one more bit for all but 32 coordinates).
template <int kD, int kBits, bool kSplit>
constexpr int kTurboQuantWords = 1 + kD * kBits / 32 + (kSplit && kBits < 4 ? kD / 32 - 1 : 0);

template <int kD, class Keys, int kVBits, bool kSplit>
struct Shape {
  static_assert(kD % 32 == 0 && Keys::kWidth % 32 == 0, "rows come in 32-coordinate chunks");
  static constexpr int kKWords = Keys::kWords;
  static constexpr int kVWords = kTurboQuantWords<kD, kVBits, kSplit>;
  static constexpr int kKRow = kKWords | 1;  // odd: word w of 32 consecutive rows, 32 banks
  static constexpr int kVRow = kVWords | 1;
  // One stage: the tile's K rows, then its V rows, one spare word (read by no one, but the value
  // phase's two-word loads stay inside the stage), rounded to 16 bytes.
  static constexpr int kStageWords = (kTile * (kKRow + kVRow) + 1 + 3) / 4 * 4;
  static constexpr int kQueryOffset = 2 * kStageWords;                                  // [8][kWidth] f32
  static constexpr int kWeightOffset = kQueryOffset + kMaxHeadsPerBlock * Keys::kWidth;  // [kTile][8]
  static constexpr int kVFactorOffset = kWeightOffset + kTile * kMaxHeadsPerBlock;
  // The value phase: thread (token share, 8-coordinate group).
  static constexpr int kGroups = kD / 8;
  static constexpr int kShares = kThreads / kGroups;
  static constexpr int kReduceOffset = kVFactorOffset + kTile;          // [kShares][kD]
  static constexpr int kTableOffset = kReduceOffset + kShares * kD;     // K 32, V 32
  static constexpr int kBytes = (kTableOffset + 64) * 4;
};

// Index i (compile-time after unrolling) of a 32-coordinate chunk held in kBits words: bits
// [i * kBits, (i + 1) * kBits) of the little-endian stream, which a 3-bit index may straddle.
template <int kBits>
__device__ __forceinline__ uint32_t index_at(const uint32_t (&w)[kBits], int i) {
  const int bit = i * kBits, word = bit / 32, shift = bit % 32;
  uint32_t v = w[word] >> shift;
  if (shift + kBits > 32) v |= w[word + 1] << (32 - shift);
  return v & ((1u << kBits) - 1u);
}

// The 32 centroids of chunk c of a run of kBits-bit indices; adds their squares to `sq`.
template <int kBits>
__device__ __forceinline__ void expand_chunk(const uint32_t* run, int c, const float* centroids, float (&out)[32],
                                             float& sq) {
  uint32_t w[kBits];
#pragma unroll
  for (int i = 0; i < kBits; ++i) w[i] = run[c * kBits + i];
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    out[i] = centroids[index_at<kBits>(w, i)];
    sq = fmaf(out[i], out[i], sq);
  }
}

// Chunk c of a TurboQuant record `row` (word 0 the norm) of `side`, the block's 32-float table
// holding its codebook (16) and, with kSplit, a split width's wider one (16 more).
template <int kBits, bool kSplit>
__device__ __forceinline__ void expand_turboquant_chunk(const CodeSide& side, const uint32_t* row, int c,
                                                        const float* table, float (&out)[32], float& sq) {
  if constexpr (kSplit && kBits < 4) {
    if (c < side.high_chunks) return expand_chunk<kBits + 1>(row + 1, c, table + 16, out, sq);
    return expand_chunk<kBits>(row + 1 + side.high_chunks * (kBits + 1), c - side.high_chunks, table, out, sq);
  }
  expand_chunk<kBits>(row + 1, c, table, out, sq);
}

// A TurboQuant side's 32-float table: its codebook, then a split width's wider one.
__device__ __forceinline__ void stage_turboquant_table(const CodeSide& side, float* table, int tid) {
  if (tid < 16) table[tid] = side.centroids[tid], table[16 + tid] = side.high_centroids[tid];
}

// After a tile of max m_new (log2 units) and weight sum `sum` for head g, whose running max was
// m_old: the running max and sum, and the factor for the old accumulator (0 while m_old is -inf).
__device__ __forceinline__ void update_running_state(int g, float m_old, float m_new, float sum, float* m_s, float* l_s,
                                                     float* rescale_s) {
  const float rescale = exp2f(m_old - m_new);
  rescale_s[g] = rescale;
  l_s[g] = l_s[g] * rescale + sum;
  m_s[g] = m_new;
}

// A value-phase thread's accumulators (8 coordinates of each of the block's heads) rescaled for a
// new running max. g is a compile-time index, so acc stays in registers.
__device__ __forceinline__ void rescale_accumulators(float (&acc)[kMaxHeadsPerBlock][8], const float* rescale_s,
                                                     int heads) {
#pragma unroll
  for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
    if (g >= heads) break;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] *= rescale_s[g];
  }
}

// acc[g][i] += w_g v_i for the block's heads: one token's 8 coordinates v and its weights w
// (kMaxHeadsPerBlock floats in shared memory, 16-byte aligned).
__device__ __forceinline__ void accumulate_weighted(float (&acc)[kMaxHeadsPerBlock][8], const float* weights,
                                                    const float (&v)[8], int heads) {
  const float4* w4 = reinterpret_cast<const float4*>(weights);
  const float4 wa = w4[0], wb = w4[1];
  const float w[kMaxHeadsPerBlock] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
#pragma unroll
  for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
    if (g >= heads) break;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(w[g], v[i], acc[g][i]);
  }
}

// The end of a split kernel of kThreads threads whose value phase left thread (token share
// `share`, 8-coordinate group `group`; values_thread where it has a share) acc[g][i], coordinate
// 8 * group + i of head g of the block, and the running max (log2 units) and sum in m_s, l_s: per
// head, the token shares added in a fixed order through red_s ([kShares][kD]), then acc / l in Out
// (one split) or the split's partial. g is a compile-time index (unrolled, leaving at `heads` for
// the whole block alike), so acc stays in registers.
template <class Out, int kD, int kShares>
__device__ __forceinline__ void finish_shares(const DecodeParams& p, int b, int split, int first_head, int heads,
                                              bool values_thread, int share, int group,
                                              const float (&acc)[kMaxHeadsPerBlock][8], float* red_s,
                                              const float* m_s, const float* l_s) {
#pragma unroll
  for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
    if (g >= heads) break;
    if (values_thread) {
#pragma unroll
      for (int i = 0; i < 8; ++i) red_s[share * kD + group * 8 + i] = acc[g][i];
    }
    __syncthreads();
    const int head = first_head + g;
    for (int e = threadIdx.x; e < kD; e += kThreads) {
      float total = 0.0f;
      for (int s = 0; s < kShares; ++s) total += red_s[s * kD + e];
      if (p.splits == 1) {
        static_cast<Out*>(p.out)[(int64_t(b) * p.hq + head) * kD + e] = from_float<Out>(total / l_s[g]);
      } else {
        float* part = p.partial + ((int64_t(b) * p.hq + head) * p.splits + split) * (kD + 2);
        part[e] = total;
        // The merge kernel's convention: the max in ln units.
        if (e == 0) part[kD] = m_s[g] / kLog2e, part[kD + 1] = l_s[g];
      }
    }
    __syncthreads();  // red_s is rewritten for the next head
  }
}

template <int kD, class Keys, int kVBits, bool kSplit>
__global__ void __launch_bounds__(kThreads) record_split_kernel(const __grid_constant__ RecordParams<typename Keys::Side> tq,
                                                                DecodeParams p) {
  using S = Shape<kD, Keys, kVBits, kSplit>;
  constexpr int kWidth = Keys::kWidth;
  extern __shared__ __align__(16) uint32_t smem[];
  float* q_s = reinterpret_cast<float*>(smem + S::kQueryOffset);
  float* w_s = reinterpret_cast<float*>(smem + S::kWeightOffset);
  float* vf_s = reinterpret_cast<float*>(smem + S::kVFactorOffset);
  float* red_s = reinterpret_cast<float*>(smem + S::kReduceOffset);
  float* kt_s = reinterpret_cast<float*>(smem + S::kTableOffset);
  float* vc_s = kt_s + 32;
  // Per stage, each tile token's record index (byte offset / R), two buffers: a thread may still be
  // reading one tile's entries to issue its copies while another writes the next tile's (the first
  // two tiles are loaded back to back, with no barrier between).
  __shared__ int64_t rec_s[2][kTile];
  __shared__ float m_s[kMaxHeadsPerBlock], l_s[kMaxHeadsPerBlock], rescale_s[kMaxHeadsPerBlock];

  const auto [split, head_chunk] = block_coordinates();
  const int b = blockIdx.z, h = head_chunk / p.chunks, chunk = head_chunk % p.chunks;
  const int first_head = h * p.group + chunk * kMaxHeadsPerBlock;
  const int heads = min(kMaxHeadsPerBlock, p.group - chunk * kMaxHeadsPerBlock);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  for (int i = tid; i < heads * kWidth; i += kThreads) q_s[i] = tq.q_rotated[(int64_t(b) * p.hq + first_head) * kWidth + i];
  Keys::stage_table(tq.k, kt_s, tid);
  stage_turboquant_table(tq.v, vc_s, tid);
  if (tid < kMaxHeadsPerBlock) m_s[tid] = -INFINITY, l_s[tid] = 0.0f;
  __syncthreads();  // an empty split reads m_s and l_s at the end without entering the tile loop

  int64_t begin, end;
  split_range<1>(p, b, split, begin, end);
  const int tiles = int((end - begin + kTile - 1) / kTile);
  const int32_t* table = p.page_table + int64_t(b) * p.table_stride;

  // Every thread takes part (barrier inside): thread t finds token t's record, then the block
  // copies the records, consecutive threads on consecutive words of one record (with kSplit, a
  // warp per record, consecutive lanes on consecutive words).
  const int k_words = Keys::words(tq.k), v_words = kSplit ? tq.v.words : S::kVWords;
  auto load_tile = [&](int tile) {
    uint32_t* k_tile = smem + (tile % 2) * S::kStageWords;
    uint32_t* v_tile = k_tile + kTile * S::kKRow;
    const int64_t first = begin + int64_t(tile) * kTile;
    const int count = int(min(int64_t(kTile), end - first));
    int64_t* rec = rec_s[tile % 2];
    if (tid < count) {
      const int64_t t = first + tid;
      rec[tid] = (int64_t(table[t / p.page_size]) * p.page_size + t % p.page_size) * p.hkv + h;
    }
    __syncthreads();
    if constexpr (kSplit) {
      for (int t = warp; t < count; t += kThreads / 32) {
        const uint8_t* k_record = tq.k.pages + rec[t] * (k_words * 4);
        const uint8_t* v_record = tq.v.pages + rec[t] * (v_words * 4);
        for (int w = lane; w < k_words; w += 32) copy_async<4>(k_tile + t * S::kKRow + w, k_record + w * 4);
        for (int w = lane; w < v_words; w += 32) copy_async<4>(v_tile + t * S::kVRow + w, v_record + w * 4);
      }
    } else {
      constexpr int kKBytes = S::kKWords * 4, kVBytes = S::kVWords * 4;
      for (int i = tid; i < count * S::kKWords; i += kThreads) {
        const int t = i / S::kKWords, w = i % S::kKWords;
        copy_async<4>(k_tile + t * S::kKRow + w, tq.k.pages + rec[t] * kKBytes + w * 4);
      }
      for (int i = tid; i < count * S::kVWords; i += kThreads) {
        const int t = i / S::kVWords, w = i % S::kVWords;
        copy_async<4>(v_tile + t * S::kVRow + w, tq.v.pages + rec[t] * kVBytes + w * 4);
      }
    }
    commit_copies();
  };

  // The value phase's thread: token share `share`, coordinates [8 * group, 8 * group + 8), whose
  // indices are 8 * width bits of a V row: one word, or two (3 bits). With kSplit the groups of a
  // split width's first 32 * high_chunks coordinates have width kVBits + 1 and the wider codebook
  // (a runtime width: a warp holds groups of both parts).
  const int group = tid % S::kGroups, share = tid / S::kGroups;
  const bool values_thread = share < S::kShares;  // D = 96: 8 threads sit the value phase out
  const int high_groups = kSplit ? 4 * tq.v.high_chunks : 0;
  const bool v_high = group < high_groups;
  const int v_width = kSplit && v_high ? kVBits + 1 : kVBits;
  const int v_bit = 32 + (v_high ? 8 * group * v_width : 8 * high_groups * (kVBits + 1) + 8 * (group - high_groups) * kVBits);
  const int v_word = v_bit / 32, v_shift = v_bit % 32;
  const bool v_two_words = v_shift + 8 * v_width > 32;
  const uint32_t v_mask = (1u << v_width) - 1u;
  const float* v_table = vc_s + (v_high ? 16 : 0);
  float acc[kMaxHeadsPerBlock][8] = {};

  if (tiles > 0) load_tile(0);
  for (int tile = 0; tile < tiles; ++tile) {
    if (tile + 1 < tiles) {
      load_tile(tile + 1);
      wait_copies<1>();
    } else {
      wait_copies<0>();
    }
    __syncthreads();
    const uint32_t* k_tile = smem + (tile % 2) * S::kStageWords;
    const uint32_t* v_tile = k_tile + kTile * S::kKRow;
    const int count = int(min(int64_t(kTile), end - begin - int64_t(tile) * kTile));

    // Scores: thread tid, token tid.
    {
      const int t = tid;
      float dot[kMaxHeadsPerBlock] = {};
      if (t < count) {
        const uint32_t* row = k_tile + t * S::kKRow;
        float sq = 0.0f;
#pragma unroll 1
        for (int c = 0; c < kWidth / 32; ++c) {
          float cv[32];
          Keys::expand(tq.k, row, c, kt_s, cv, sq);
#pragma unroll
          for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
            if (g >= heads) break;
            const float4* q4 = reinterpret_cast<const float4*>(q_s + g * kWidth + c * 32);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              const float4 qq = q4[i];
              dot[g] = fmaf(qq.x, cv[4 * i], dot[g]);
              dot[g] = fmaf(qq.y, cv[4 * i + 1], dot[g]);
              dot[g] = fmaf(qq.z, cv[4 * i + 2], dot[g]);
              dot[g] = fmaf(qq.w, cv[4 * i + 3], dot[g]);
            }
          }
        }
        const float k_factor = Keys::factor(tq.k, row, sq);
#pragma unroll
        for (int g = 0; g < kMaxHeadsPerBlock; ++g) dot[g] *= k_factor;
        const uint32_t* v_row = v_tile + t * S::kVRow;
        const float v_norm = __uint_as_float(v_row[0]);
        float v_factor = v_norm;
        if (tq.v.norm_corrected) {
          float v_sq = 0.0f;
#pragma unroll 1
          for (int c = 0; c < kD / 32; ++c) {
            float cv[32];
            expand_turboquant_chunk<kVBits, kSplit>(tq.v, v_row, c, vc_s, cv, v_sq);
          }
          v_factor = v_norm / sqrtf(v_sq);
        }
        vf_s[t] = v_factor;
      }
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) w_s[t * kMaxHeadsPerBlock + g] = t < count ? dot[g] : -INFINITY;
    }
    __syncthreads();

    // Softmax over the tile, a warp per head (scores in log2 units: q' carries log2(e)).
    for (int g = warp; g < heads; g += kThreads / 32) {
      float tile_max = -INFINITY;
      for (int t = lane; t < count; t += 32) tile_max = fmaxf(tile_max, w_s[t * kMaxHeadsPerBlock + g]);
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
      const float m_old = m_s[g], m_new = fmaxf(m_old, tile_max);
      float sum = 0.0f;
      for (int t = lane; t < count; t += 32) {
        const float w = exp2f(w_s[t * kMaxHeadsPerBlock + g] - m_new);
        w_s[t * kMaxHeadsPerBlock + g] = w * vf_s[t];
        sum += w;
      }
      sum = group_sum<32>(sum);
      __syncwarp();
      if (lane == 0) update_running_state(g, m_old, m_new, sum, m_s, l_s, rescale_s);
    }
    __syncthreads();

    // Values: the tile's weighted centroid rows, in V's rotated domain.
    if (values_thread) {
      rescale_accumulators(acc, rescale_s, heads);
      for (int t = share; t < count; t += S::kShares) {
        const uint32_t* v_row = v_tile + t * S::kVRow;
        const uint32_t lo = v_row[v_word], hi = v_two_words ? v_row[v_word + 1] : 0u;
        const uint32_t bits = __funnelshift_r(lo, hi, unsigned(v_shift));
        float cv[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if constexpr (kSplit) {
            cv[i] = v_table[(bits >> (i * v_width)) & v_mask];
          } else {
            cv[i] = vc_s[(bits >> (i * kVBits)) & ((1u << kVBits) - 1u)];
          }
        }
        accumulate_weighted(acc, w_s + t * kMaxHeadsPerBlock, cv, heads);
      }
    }
    __syncthreads();  // the stage is reloaded by the next iteration
  }

  finish_shares<float, kD, S::kShares>(p, b, split, first_head, heads, values_thread, share, group, acc, red_s, m_s,
                                       l_s);
}

// The launch of record_split_kernel for policy Keys (kSplit: the split-width kernel): `a` the op's
// arguments, k_side the keys as the kernel reads them, projection_t q's projection into the keys'
// domain (kD x Keys::kWidth f32).
template <class T, int kD, class Keys, int kVBits, bool kSplit, class Args>
cudaError_t launch_record_split_attention(const Args& a, const typename Keys::Side& k_side, const float* projection_t,
                                          cudaStream_t stream) {
  return launch_record_attention<T, kD, Keys::kWidth, record_split_kernel<kD, Keys, kVBits, kSplit>, kThreads,
                                 Shape<kD, Keys, kVBits, kSplit>::kBytes, kTile>(a, k_side, projection_t, stream);
}

}  // namespace decodelab::cuda::turboquant
