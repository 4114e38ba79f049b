// CUDA fused decode attention over the paged KIVI cache (kivi_cache.h): scores and the value sum
// straight from the key blocks, the value records and the f32 recent window; the cache is never
// decoded into memory. The algebra is the cpu kernel's (src/cpu/kivi_attention.cpp): channel d of
// a key block has (lo_d, s_d) over its G tokens, so token t scores
//   q . k~_t = q . lo + sum_d (q_d s_d) code_td,
// q * s and q . lo folded once per block and query head, then one dot product of q * s with the
// integer codes per token; a quantized value is lo + s * code per group of channels of its token.
//
// record_attention.cuh's plan: a block per (sequence, KV head, split of the length, chunk of <= 8
// query heads of the GQA group), so each key block and value record is read once per group; the
// splits' partials merged by decode_attention.cuh's merge kernel (log-sum-exp, fixed order), no
// merge with one split. 128 threads, tiles of at most 32 tokens, two tiles in flight:
//   tiles   splits start at multiples of G and a tile ends at its key block's end, so a tile never
//           spans two blocks and one fold serves it; at G a multiple of 32 every tile but a
//           split's last has 32 tokens (G = 16: tiles of 16). Qk is a multiple of G, so a tile's
//           keys are all quantized or all recent; its values may be both (Qv is any count).
//   stage   4-byte cp.async copies into shared memory, consecutive lanes on consecutive words, of
//           the tile's key code rows (a contiguous run of its block), the block's lo and scale
//           when the tile starts a block, and the value records of its quantized tokens (a warp
//           per record); rows padded to an odd number of words. The f32 ring is not staged: it
//           holds at most R + G - 1 keys and R values of a sequence, against thousands of
//           quantized tokens, and a stage sized for 32 f32 rows would be several times one of
//           codes (fewer blocks per SM for every tile), so the few recent tiles read it from
//           global memory (L2) where they use it, 32 bytes a thread.
//   fold    when a tile starts a block: q * s for every head into shared memory, and q . lo (a
//           warp per head, a fixed order).
//   scores  warp w takes the 8-channel groups w, w + 4, ... of the tile's tokens, lane j token j:
//           8 codes (8 b bits of the row: one word or two) as floats against every head's folded
//           q (the same address for the whole warp: a broadcast; the odd row stride puts the 32
//           lanes' words in 32 banks), or the 8 f32 channels of a recent key against q. The four
//           warps' partial dots go to shared memory, so a code is expanded once for all heads.
//   softmax a warp per head, lane j token j: the partials added in warp order, plus q . lo; the
//           tile's max, exp2 weights (q carries scale * log2(e)), the running max and sum, the
//           factor for the old accumulator.
//   values  as record_attention.cuh: thread (token share, 8-channel group) decodes lo + s * code
//           for its 8 channels (in one value group: value_group a multiple of 8) or reads them
//           from the ring, and accumulates every head of the block in registers; the shares are
//           added in a fixed order at the end (finish_shares).
// Every order is fixed, so results are the same bits run to run. Record contents are not checked
// (kivi_cache.h): a corrupt (lo, scale) pair gives NaN or wrong outputs, as in the CUDA
// TurboQuant kernels.
#include <algorithm>

#include "cuda/record_attention.cuh"

namespace decodelab::cuda {
namespace {

using turboquant::accumulate_weighted;
using turboquant::finish_shares;
using turboquant::rescale_accumulators;
using turboquant::update_running_state;
using turboquant::kLog2e;
using turboquant::kThreads;

constexpr int kWarps = kThreads / 32;
constexpr int kKiviTile = 32;  // tokens per tile: one per lane in the score and softmax phases
// Shortest split: its fixed costs (q, the first block's fold, the partial) over at least 4 tiles.
constexpr int64_t kMinSplit = 128;

// The cache as the kernel reads it (kivi_cache.h's layout); q, out, lengths and the page table
// come through DecodeParams.
struct KiviSide {
  const uint32_t* k_pages;   // [num_pages, P / G, Hkv, Kb], as words
  const uint32_t* v_pages;   // [num_pages, P, Hkv, Vb]
  const float* recent_k;     // [B, W, Hkv, D]
  const float* recent_v;
  int64_t key_group;         // G
  int64_t residual;          // R
  int64_t window;            // W = R + G
  int key_block_words;       // Kb / 4
  int value_record_words;    // Vb / 4
  int value_groups;          // D / value_group: a value record's (lo, scale) pairs
  int value_group;           // channels per value group, a multiple of 8
};

// Shared memory of the split kernel, in 4-byte words.
template <int kD, int kBits>
struct KiviShape {
  static_assert(kD % 32 == 0, "a token's codes are whole words and 4 warps share its 8-channel groups");
  static constexpr int kCodeWords = kD * kBits / 32;  // a token's codes, in a key block or a value record
  static constexpr int kKRow = kCodeWords | 1;        // odd: word w of 32 consecutive rows, 32 banks
  // A value record at value groups of 8 channels or more: at most D / 8 (lo, scale) pairs, the codes.
  static constexpr int kVRow = (kD / 4 + kCodeWords) | 1;
  // One stage: the block's lo and scale (2 D words), the tile's key code rows, its value records,
  // rounded to 16 bytes.
  static constexpr int kHeaderWords = 2 * kD;
  static constexpr int kStageWords = (kHeaderWords + kKiviTile * (kKRow + kVRow) + 3) / 4 * 4;
  static constexpr int kQueryOffset = 2 * kStageWords;                                   // [8][kD] scaled q
  static constexpr int kFoldOffset = kQueryOffset + kMaxHeadsPerBlock * kD;              // [8][kD] q * s
  static constexpr int kPartOffset = kFoldOffset + kMaxHeadsPerBlock * kD;               // [warp][8][kKiviTile]
  static constexpr int kWeightOffset = kPartOffset + kWarps * kMaxHeadsPerBlock * kKiviTile;  // [kKiviTile][8]
  // The value phase: thread (token share, 8-channel group).
  static constexpr int kGroups = kD / 8;
  static constexpr int kShares = kThreads / kGroups;
  static constexpr int kReduceOffset = kWeightOffset + kKiviTile * kMaxHeadsPerBlock;  // [kShares][kD]
  static constexpr int kBytes = (kReduceOffset + kShares * kD) * 4;
};

// The 8 codes of channels [8 * group, 8 * group + 8) of a run of kBits-bit codes (kvquant.h's
// little-endian stream) that starts at word `run`: 8 * kBits bits, in one word or across two
// (3 bits), code i at bits [i * kBits, (i + 1) * kBits) of the result.
template <int kBits>
__device__ __forceinline__ uint32_t group_codes(const uint32_t* run, int group) {
  const int bit = 8 * kBits * group, word = bit / 32, shift = bit % 32;
  const uint32_t lo = run[word], hi = shift + 8 * kBits > 32 ? run[word + 1] : 0u;
  return __funnelshift_r(lo, hi, unsigned(shift));
}

template <class T, int kD, int kBits>
__global__ void __launch_bounds__(kThreads) kivi_split_kernel(const __grid_constant__ KiviSide c, DecodeParams p) {
  using S = KiviShape<kD, kBits>;
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  extern __shared__ __align__(16) uint32_t smem[];
  float* q_s = reinterpret_cast<float*>(smem + S::kQueryOffset);
  float* fold_s = reinterpret_cast<float*>(smem + S::kFoldOffset);
  float* part_s = reinterpret_cast<float*>(smem + S::kPartOffset);
  float* w_s = reinterpret_cast<float*>(smem + S::kWeightOffset);
  float* red_s = reinterpret_cast<float*>(smem + S::kReduceOffset);
  __shared__ float base_s[kMaxHeadsPerBlock];  // q . lo of the current key block
  __shared__ float m_s[kMaxHeadsPerBlock], l_s[kMaxHeadsPerBlock], rescale_s[kMaxHeadsPerBlock];

  const auto [split, head_chunk] = turboquant::block_coordinates();
  const int b = blockIdx.z, h = head_chunk / p.chunks, chunk = head_chunk % p.chunks;
  const int first_head = h * p.group + chunk * kMaxHeadsPerBlock;
  const int heads = min(kMaxHeadsPerBlock, p.group - chunk * kMaxHeadsPerBlock);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  const T* q = static_cast<const T*>(p.q) + (int64_t(b) * p.hq + first_head) * kD;
  for (int i = tid; i < heads * kD; i += kThreads) q_s[i] = to_float(q[i]) * p.scale * kLog2e;
  if (tid < kMaxHeadsPerBlock) m_s[tid] = -INFINITY, l_s[tid] = 0.0f;
  __syncthreads();  // an empty split reads m_s and l_s at the end without entering the tile loop

  // KiviCache's counts (kivi_record.h: kivi_quantized_values, kivi_quantized_keys).
  const int64_t length = p.lengths[b];
  const int64_t quantized_values = max(length - c.residual, int64_t(0));
  const int64_t quantized_keys = quantized_values / c.key_group * c.key_group;
  int64_t begin, end;
  split_range(p, b, split, c.key_group, begin, end);  // begin: a multiple of G, the start of a block
  const int32_t* table = p.page_table + int64_t(b) * p.table_stride;

  // The end of the tile that starts at t0: 32 tokens on, the split's end or its key block's end.
  const auto tile_end = [&](int64_t t0) {
    const int64_t e = min(end, t0 + kKiviTile);
    return t0 < quantized_keys ? min(e, (t0 / c.key_group + 1) * c.key_group) : e;
  };

  // The copies of tile [t0, t1) into stage `stage`; no barrier inside.
  const auto load_tile = [&](int64_t t0, int64_t t1, int stage) {
    uint32_t* header = smem + stage * S::kStageWords;
    uint32_t* k_rows = header + S::kHeaderWords;
    uint32_t* v_rows = k_rows + kKiviTile * S::kKRow;
    if (t0 < quantized_keys) {
      // The block of tokens [first, first + G) (kivi_cache.h: a page holds P / G whole blocks).
      const int64_t first = t0 / c.key_group * c.key_group;
      const int64_t page = table[first / p.page_size];
      const int64_t index = page * (p.page_size / c.key_group) + first % p.page_size / c.key_group;
      const uint32_t* block = c.k_pages + (index * p.hkv + h) * c.key_block_words;
      if (t0 == first) {
        for (int w = tid; w < S::kHeaderWords; w += kThreads) copy_async<4>(header + w, block + w);
      }
      const uint32_t* codes = block + S::kHeaderWords + (t0 - first) * S::kCodeWords;
      const int words = int(t1 - t0) * S::kCodeWords;
      for (int i = tid; i < words; i += kThreads) {
        copy_async<4>(k_rows + i / S::kCodeWords * S::kKRow + i % S::kCodeWords, codes + i);
      }
    }
    for (int64_t t = t0 + warp; t < min(t1, quantized_values); t += kWarps) {
      const int64_t slot = int64_t(table[t / p.page_size]) * p.page_size + t % p.page_size;
      const uint32_t* record = c.v_pages + (slot * p.hkv + h) * c.value_record_words;
      uint32_t* row = v_rows + (t - t0) * S::kVRow;
      for (int w = lane; w < c.value_record_words; w += 32) copy_async<4>(row + w, record + w);
    }
    commit_copies();
  };

  // The value phase's thread: token share `share`, channels [8 * group, 8 * group + 8), which lie
  // in value group v_pair (its (lo, scale) pair in a record).
  const int group = tid % S::kGroups, share = tid / S::kGroups;
  const bool values_thread = share < S::kShares;  // D = 96: 8 threads sit the value phase out
  const int v_pair = group * 8 / c.value_group;
  float acc[kMaxHeadsPerBlock][8] = {};

  int64_t t0 = begin, t1 = tile_end(begin);
  if (t0 < end) load_tile(t0, t1, 0);
  for (int stage = 0; t0 < end; stage ^= 1) {
    const int64_t t2 = tile_end(t1);  // the next tile: [t1, t2)
    if (t1 < end) {
      load_tile(t1, t2, stage ^ 1);
      wait_copies<1>();
    } else {
      wait_copies<0>();
    }
    __syncthreads();
    const uint32_t* header = smem + stage * S::kStageWords;
    const uint32_t* k_rows = header + S::kHeaderWords;
    const uint32_t* v_rows = k_rows + kKiviTile * S::kKRow;
    const int n = int(t1 - t0);
    const bool quantized = t0 < quantized_keys;

    // The fold, when the tile starts a block (and only then did the stage get the header).
    if (quantized && t0 % c.key_group == 0) {
      const float* lo = reinterpret_cast<const float*>(header);
      const float* scale = lo + kD;
      for (int i = tid; i < heads * kD; i += kThreads) fold_s[i] = q_s[i] * scale[i % kD];
      for (int g = warp; g < heads; g += kWarps) {
        float sum = 0.0f;
        for (int d = lane; d < kD; d += 32) sum = fmaf(q_s[g * kD + d], lo[d], sum);
        sum = group_sum<32>(sum);
        if (lane == 0) base_s[g] = sum;
      }
      __syncthreads();
    }

    // Scores: warp `warp`'s channel groups of token `lane`.
    {
      const float* qk = quantized ? fold_s : q_s;
      float dot[kMaxHeadsPerBlock] = {};
      if (lane < n) {
        const uint32_t* row = k_rows + lane * S::kKRow;
        const float* recent = nullptr;
        if (!quantized) recent = c.recent_k + ((int64_t(b) * c.window + (t0 + lane) % c.window) * p.hkv + h) * kD;
#pragma unroll
        for (int i = 0; i < kD / 32; ++i) {
          const int g8 = warp + kWarps * i;  // channels [8 * g8, 8 * g8 + 8)
          float k[8];
          if (quantized) {
            const uint32_t codes = group_codes<kBits>(row, g8);
#pragma unroll
            for (int j = 0; j < 8; ++j) k[j] = float((codes >> (j * kBits)) & kMask);
          } else {
            const float4 x = __ldg(reinterpret_cast<const float4*>(recent + 8 * g8));
            const float4 y = __ldg(reinterpret_cast<const float4*>(recent + 8 * g8 + 4));
            k[0] = x.x, k[1] = x.y, k[2] = x.z, k[3] = x.w, k[4] = y.x, k[5] = y.y, k[6] = y.z, k[7] = y.w;
          }
#pragma unroll
          for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
            if (g >= heads) break;
            const float4* q4 = reinterpret_cast<const float4*>(qk + g * kD + 8 * g8);
            const float4 qa = q4[0], qb = q4[1];
            dot[g] = fmaf(qa.x, k[0], dot[g]);
            dot[g] = fmaf(qa.y, k[1], dot[g]);
            dot[g] = fmaf(qa.z, k[2], dot[g]);
            dot[g] = fmaf(qa.w, k[3], dot[g]);
            dot[g] = fmaf(qb.x, k[4], dot[g]);
            dot[g] = fmaf(qb.y, k[5], dot[g]);
            dot[g] = fmaf(qb.z, k[6], dot[g]);
            dot[g] = fmaf(qb.w, k[7], dot[g]);
          }
        }
      }
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
        if (g < heads) part_s[(warp * kMaxHeadsPerBlock + g) * kKiviTile + lane] = dot[g];
      }
    }
    __syncthreads();

    // Softmax over the tile, a warp per head, lane j token j (scores in log2 units).
    for (int g = warp; g < heads; g += kWarps) {
      float s = -INFINITY;
      if (lane < n) {
        s = part_s[g * kKiviTile + lane];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) s += part_s[(w * kMaxHeadsPerBlock + g) * kKiviTile + lane];
        if (quantized) s += base_s[g];
      }
      float tile_max = s;
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
      }
      const float m_old = m_s[g], m_new = fmaxf(m_old, tile_max);  // finite: the tile has a token
      const float weight = exp2f(s - m_new);                         // 0 past the tile's tokens
      w_s[lane * kMaxHeadsPerBlock + g] = weight;
      const float sum = group_sum<32>(weight);
      __syncwarp();
      if (lane == 0) update_running_state(g, m_old, m_new, sum, m_s, l_s, rescale_s);
    }
    __syncthreads();

    // Values: the tile's decoded rows (or the ring's), weighted, into the registers.
    if (values_thread) {
      rescale_accumulators(acc, rescale_s, heads);
      for (int t = share; t < n; t += S::kShares) {
        const int64_t token = t0 + t;
        float v[8];
        if (token < quantized_values) {
          const uint32_t* row = v_rows + t * S::kVRow;
          const float lo = __uint_as_float(row[v_pair]), scale = __uint_as_float(row[c.value_groups + v_pair]);
          const uint32_t codes = group_codes<kBits>(row + 2 * c.value_groups, group);
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = fmaf(scale, float((codes >> (i * kBits)) & kMask), lo);
        } else {
          const float* recent = c.recent_v + ((int64_t(b) * c.window + token % c.window) * p.hkv + h) * kD + 8 * group;
          const float4 x = __ldg(reinterpret_cast<const float4*>(recent));
          const float4 y = __ldg(reinterpret_cast<const float4*>(recent + 4));
          v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w, v[4] = y.x, v[5] = y.y, v[6] = y.z, v[7] = y.w;
        }
        accumulate_weighted(acc, w_s + t * kMaxHeadsPerBlock, v, heads);
      }
    }
    __syncthreads();  // the stage is reloaded by the next iteration
    t0 = t1;
    t1 = t2;
  }

  finish_shares<T, kD, S::kShares>(p, b, split, first_head, heads, values_thread, share, group, acc, red_s, m_s, l_s);
}

template <class T, int kD, int kBits>
cudaError_t launch_kivi_attention(const KiviDecodeAttentionPagedArgs& a, cudaStream_t stream) {
  constexpr auto kernel = kivi_split_kernel<T, kD, kBits>;
  constexpr int kBytes = KiviShape<kD, kBits>::kBytes;
  if (const cudaError_t e = allow_dynamic_smem<kernel>(kBytes); e != cudaSuccess) return e;
  const PagedKiviKV& cache = a.cache;
  const kvquant::KiviConfig& config = cache.codec->config();
  const KiviSide side{cache.k_pages.ptr<const uint32_t>(),
                      cache.v_pages.ptr<const uint32_t>(),
                      cache.recent_k.ptr<const float>(),
                      cache.recent_v.ptr<const float>(),
                      config.key_group,
                      config.residual,
                      cache.recent_k.dim(1),
                      int(cache.codec->key_block_bytes() / 4),
                      int(cache.codec->value_record_bytes() / 4),
                      int(config.head_dim / config.value_group),
                      int(config.value_group)};
  const int batch = int(a.q.dim(0));
  DecodeParams p{};
  p.q = a.q.data;
  p.lengths = cache.lengths.ptr<const int32_t>();
  p.page_table = cache.page_table.ptr<const int32_t>();
  p.table_stride = cache.page_table.dim(1);
  p.page_size = int(cache.v_pages.dim(1));
  p.hq = int(a.q.dim(1));
  p.hkv = int(cache.v_pages.dim(2));
  p.group = p.hq / p.hkv;
  p.chunks = (p.group + kMaxHeadsPerBlock - 1) / kMaxHeadsPerBlock;
  p.scale = a.options.scale;
  p.out = a.out.data;
  const int64_t capacity = p.table_stride * p.page_size;
  p.splits = choose_splits(p, batch, capacity, resident_blocks<kernel>(kThreads, kBytes),
                           std::max(config.key_group, kMinSplit));
  return launch_split_merge<T, kD>(p, batch, stream, [&](dim3 grid, const DecodeParams& dp) {
    kernel<<<grid, kThreads, kBytes, stream>>>(side, dp);
  });
}

}  // namespace

void kivi_decode_attention_paged(const KiviDecodeAttentionPagedArgs& a) {
  const cudaStream_t stream = stream_of(a.stream);
  const cudaError_t status = dispatch_activation(a.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    return turboquant::with_one_of<64, 96, 128, 256>(a.q.dim(2), [&](auto d) {
      return turboquant::with_one_of<1, 2, 3, 4>(a.cache.codec->config().bits, [&](auto bits) {
        return launch_kivi_attention<T, decltype(d)::value, decltype(bits)::value>(a, stream);
      });
    });
  });
  check_launch(status, "kivi_decode_attention_paged");
}

}  // namespace decodelab::cuda
