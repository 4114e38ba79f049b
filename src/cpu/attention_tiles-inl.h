// The tile kernels that CPU decode attention over f16/bf16/f32 caches (attention.cpp) and over
// TurboQuant codes (turboquant_attention.cpp) share: dot products of query rows with key rows,
// the online softmax of a tile (Milakov & Gimelshein 2018), the P.V accumulation, and the
// log-sum-exp merge of split-K partial states (Flash-Decoding, Dao et al. 2023), and the split of
// a paged cache's keys into tasks. Key and value
// rows are given as row pointers of any element type that LoadF32 widens, so a kernel that
// expands codes into f32 rows runs the same arithmetic. Include it after "hwy/highway.h" inside a
// file compiled once per target (foreach_target.h).
#if defined(DECODELAB_CPU_ATTENTION_TILES_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef DECODELAB_CPU_ATTENTION_TILES_INL_H_
#undef DECODELAB_CPU_ATTENTION_TILES_INL_H_
#else
#define DECODELAB_CPU_ATTENTION_TILES_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// f32 vectors of at most 16 lanes: D is a multiple of 16, so head rows never leave a tail.
using DF = hn::CappedTag<float, 16>;
using VF = hn::Vec<DF>;

// The score of "no key": below any real score yet finite, so that differences stay finite and
// inside hn::Exp's valid range [-FLT_MAX, 104] (it returns 0 there).
constexpr float kNoScore = -1e30f;

inline int64_t DivCeil(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t RoundUp(int64_t a, int64_t b) { return DivCeil(a, b) * b; }

// Split-K for decode: a row set's keys are split into at least kMinSplitKeys keys per split, and
// into enough splits that all row sets together make about kTargetTasks tasks, so that B * Hkv
// small still feeds the threads. The split points depend on the shape alone (never the thread
// count), so every run merges the same partial states in the same order: the same bits.
constexpr int64_t kMinSplitKeys = 64;
constexpr int64_t kTargetTasks = 64;

// The most splits a row set may have when there are `row_sets` of them.
inline int64_t MaxSplits(int64_t row_sets) { return DivCeil(kTargetTasks, row_sets); }

// The keys per split (the last may have fewer) of a row set of `keys` keys, tile-aligned.
inline int64_t SplitKeys(int64_t keys, int64_t max_splits, int64_t tile) {
  const int64_t want = std::clamp(DivCeil(keys, kMinSplitKeys), int64_t{1}, max_splits);
  return RoundUp(DivCeil(keys, want), tile);
}

// Split-K decode over a paged cache: the keys [t_begin, t_end) of KV head h of sequence b, one
// task's share. A (b, h)'s tasks are consecutive, in key order.
struct DecodeTask {
  int64_t b, h, t_begin, t_end;
};

struct HeadSplits {
  int64_t first_task, splits;
};

// Tasks for every (b, h) in order, each one's lengths[b] keys split in `tile`-aligned chunks.
inline void MakeDecodeTasks(const int32_t* lengths, int64_t batch, int64_t hkv, int64_t tile,
                            std::vector<DecodeTask>& tasks, std::vector<HeadSplits>& heads) {
  const int64_t max_splits = MaxSplits(batch * hkv);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t keys = lengths[b];
    const int64_t chunk = SplitKeys(keys, max_splits, tile);
    for (int64_t h = 0; h < hkv; ++h) {
      heads.push_back({int64_t(tasks.size()), DivCeil(keys, chunk)});
      for (int64_t t = 0; t < keys; t += chunk) tasks.push_back({b, h, t, std::min(keys, t + chunk)});
    }
  }
}

// Calls fn(std::integral_constant<int, k>) with k = count in 1..4: runtime block sizes to
// compile-time ones, so that register blocks are arrays the compiler keeps in registers.
template <class Fn>
HWY_INLINE void WithBlock(int64_t count, Fn&& fn) {
  switch (count) {
    case 1: fn(std::integral_constant<int, 1>()); break;
    case 2: fn(std::integral_constant<int, 2>()); break;
    case 3: fn(std::integral_constant<int, 3>()); break;
    default: fn(std::integral_constant<int, 4>()); break;
  }
}

// out[0..4) = the lane sums of a, b, c, e. A transpose-and-add tree does all four in about 13
// shuffles and adds on AVX-512, where four separate reductions take about 32.
#if HWY_TARGET == HWY_SCALAR
HWY_INLINE void SumOfLanes4(DF /*d*/, VF a, VF b, VF c, VF e, float* HWY_RESTRICT out) {
  out[0] = hn::GetLane(a);
  out[1] = hn::GetLane(b);
  out[2] = hn::GetLane(c);
  out[3] = hn::GetLane(e);
}
#else
// Adds the 128-bit blocks of v: one 4-lane vector.
template <class D>
HWY_INLINE auto AddBlocks(D d, hn::Vec<D> v) {
  if constexpr (hn::MaxLanes(d) > 4) {
    const hn::Half<D> dh;
    return AddBlocks(dh, hn::Add(hn::LowerHalf(dh, v), hn::UpperHalf(dh, v)));
  } else {
    return v;
  }
}

// Per 128-bit block: the partial sums {a, b, c, e} of that block's lanes.
HWY_INLINE VF BlockSums4(DF d, VF a, VF b, VF c, VF e) {
  const hn::Repartition<uint64_t, DF> d64;
  // Per 128-bit block: {a0+a2, b0+b2, a1+a3, b1+b3}, and the same for c, e.
  const auto ab = hn::BitCast(d64, hn::Add(hn::InterleaveLower(d, a, b), hn::InterleaveUpper(d, a, b)));
  const auto ce = hn::BitCast(d64, hn::Add(hn::InterleaveLower(d, c, e), hn::InterleaveUpper(d, c, e)));
  return hn::Add(hn::BitCast(d, hn::InterleaveLower(d64, ab, ce)), hn::BitCast(d, hn::InterleaveUpper(d64, ab, ce)));
}

HWY_INLINE void SumOfLanes4(DF d, VF a, VF b, VF c, VF e, float* HWY_RESTRICT out) {
  hn::StoreU(AddBlocks(d, BlockSums4(d, a, b, c, e)), hn::Full128<float>(), out);
}
#endif

// Fixed-size targets with at least 4 f32 lanes take the batched scores (DotBatch) below; the
// macro says so to the kernels of the target being compiled.
#undef DECODELAB_ATTENTION_DOT_BATCH
#if HWY_TARGET != HWY_SCALAR && !HWY_HAVE_SCALABLE
#define DECODELAB_ATTENTION_DOT_BATCH 1

// Lane i of the result: the sum of the lanes of v[i], for the N = Lanes(d) vectors v. A
// transpose-and-add tree: N / 4 BlockSums4, then the 128-bit blocks are added pairwise, about
// 34 shuffles and adds for 16 sums on AVX-512 (four SumOfLanes4 take about 52 and leave the sums
// in memory).
HWY_INLINE VF SumEach(DF d, const VF* HWY_RESTRICT v) {
  constexpr size_t N = hn::MaxLanes(DF());
  static_assert(N == 4 || N == 8 || N == 16, "SumEach: 4, 8 or 16 lanes");
  VF w[N / 4];
  for (size_t k = 0; k < N / 4; ++k) w[k] = BlockSums4(d, v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
  if constexpr (N == 4) {
    return w[0];
  } else if constexpr (N == 8) {
    return hn::Add(hn::ConcatLowerLower(d, w[1], w[0]), hn::ConcatUpperUpper(d, w[1], w[0]));
  } else {
    // a = [w0 blocks 0+2, 1+3 | w2 blocks 0+2, 1+3], b the same of w1, w3; then adjacent blocks.
    const VF a = hn::Add(hn::ConcatLowerLower(d, w[2], w[0]), hn::ConcatUpperUpper(d, w[2], w[0]));
    const VF b = hn::Add(hn::ConcatLowerLower(d, w[3], w[1]), hn::ConcatUpperUpper(d, w[3], w[1]));
    return hn::Add(hn::OddEvenBlocks(b, a), hn::SwapAdjacentBlocks(hn::OddEvenBlocks(a, b)));
  }
}

// Keys per DotBatch of kRows rows: one vector of scores.
template <int kRows>
constexpr int64_t BatchKeys() {
  return int64_t(hn::MaxLanes(DF())) / kRows;
}

// Scores of kRows (1, 2 or 4) query rows (stride d) against the BatchKeys<kRows>() keys
// k_rows[0..): s[r * stride + j]. The N (key, row) accumulators are summed by one SumEach, whose
// lane r * keys + j is the score of row r and key j; each row's run of lanes is stored in place.
template <int kRows, class T>
HWY_INLINE void DotBatch(const float* HWY_RESTRICT q, int64_t d, const T* const* k_rows, float* HWY_RESTRICT s,
                         int64_t stride) {
  const DF df;
  constexpr int N = int(hn::MaxLanes(DF())), kKeys = int(BatchKeys<kRows>());
  static_assert(kKeys >= 1 && kKeys * kRows == N, "DotBatch: kRows must divide the lanes");
  VF acc[N];
  for (int i = 0; i < N; ++i) acc[i] = hn::Zero(df);
  for (int64_t c = 0; c < d; c += N) {
    VF qv[kRows];
    for (int r = 0; r < kRows; ++r) qv[r] = KeepInRegister(hn::LoadU(df, q + r * d + c));
    for (int j = 0; j < kKeys; ++j) {
      const VF kv = LoadF32(df, k_rows[j] + c);
      for (int r = 0; r < kRows; ++r) acc[r * kKeys + j] = hn::MulAdd(qv[r], kv, acc[r * kKeys + j]);
    }
  }
  const VF sums = SumEach(df, acc);
  if constexpr (kRows == 1) {
    hn::StoreU(sums, df, s);
  } else {
    // Row r's lanes [r * kKeys, (r + 1) * kKeys) go to s + r * stride: a masked store of the whole
    // vector from r * kKeys lanes before it (stride >= kKeys, so that stays inside s).
    for (int r = 0; r < kRows; ++r) {
      const auto lanes = hn::AndNot(hn::FirstN(df, size_t(r * kKeys)), hn::FirstN(df, size_t((r + 1) * kKeys)));
      hn::BlendedStore(sums, lanes, df, s + r * (stride - kKeys));
    }
  }
}
#endif  // HWY_TARGET != HWY_SCALAR && !HWY_HAVE_SCALABLE

// Scores of kRows query rows (stride d) against the kKeys keys k_rows[0..kKeys): s[r * stride + j].
// Every (key, row) pair has its own accumulator: kKeys * kRows independent FMA chains, summed
// four at a time.
template <int kRows, int kKeys, class T>
HWY_INLINE void DotKeys(const float* HWY_RESTRICT q, int64_t d, const T* const* k_rows, float* HWY_RESTRICT s,
                        int64_t stride) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df));
  constexpr int kSums = kKeys * kRows, kPadded = (kSums + 3) / 4 * 4;
  VF acc[kPadded];
  for (int i = 0; i < kPadded; ++i) acc[i] = hn::Zero(df);
  for (int64_t c = 0; c < d; c += N) {
    VF qv[kRows];
    for (int r = 0; r < kRows; ++r) qv[r] = hn::LoadU(df, q + r * d + c);
    for (int j = 0; j < kKeys; ++j) {
      const VF kv = LoadF32(df, k_rows[j] + c);
      for (int r = 0; r < kRows; ++r) acc[j * kRows + r] = hn::MulAdd(qv[r], kv, acc[j * kRows + r]);
    }
  }
  float sums[kPadded];
  for (int i = 0; i < kPadded; i += 4) SumOfLanes4(df, acc[i], acc[i + 1], acc[i + 2], acc[i + 3], sums + i);
  for (int j = 0; j < kKeys; ++j) {
    for (int r = 0; r < kRows; ++r) s[r * stride + j] = sums[j * kRows + r];
  }
}

// For kRows rows (stride d) and dims [c, c + kVecs * N): acc = acc * corr + sum_j p[j] * v[j].
// The accumulators stay in registers over the whole tile; each V vector serves kRows rows.
template <int kRows, int kVecs, class T>
HWY_INLINE void AccumulateRows(const float* HWY_RESTRICT p, int64_t stride, const float* HWY_RESTRICT corr,
                               const T* const* v_rows, int64_t n, int64_t c, float* HWY_RESTRICT acc, int64_t d) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df));
  VF a[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    const VF cr = hn::Set(df, corr[r]);
    for (int v = 0; v < kVecs; ++v) a[r][v] = hn::Mul(hn::LoadU(df, acc + r * d + c + v * N), cr);
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* HWY_RESTRICT vr = v_rows[j] + c;
    VF x[kVecs];
    for (int v = 0; v < kVecs; ++v) x[v] = LoadF32(df, vr + v * N);
    for (int r = 0; r < kRows; ++r) {
      const VF pr = hn::Set(df, p[r * stride + j]);
      for (int v = 0; v < kVecs; ++v) a[r][v] = hn::MulAdd(pr, x[v], a[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) hn::StoreU(a[r][v], df, acc + r * d + c + v * N);
  }
}

// Online softmax of a tile of n scores for `rows` rows (stride apart), of which row r sees the
// first seen[r]: the scores become probabilities exp(s - m) (0 past seen[r]), m[r] and l[r]
// advance, corr[r] rescales the row's accumulator. The corrections of N rows take one vector Exp.
HWY_INLINE void SoftmaxRows(float* HWY_RESTRICT s, int64_t stride, int64_t rows, const int64_t* HWY_RESTRICT seen,
                            int64_t n, float* HWY_RESTRICT m, float* HWY_RESTRICT l, float* HWY_RESTRICT corr) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df));
  constexpr size_t kMaxLanes = hn::MaxLanes(DF());
  for (int64_t r0 = 0; r0 < rows; r0 += N) {
    const int64_t count = std::min(N, rows - r0);
    HWY_ALIGN float m_old[kMaxLanes] = {}, m_new[kMaxLanes] = {}, c[kMaxLanes];
    for (int64_t r = 0; r < count; ++r) {
      const float* HWY_RESTRICT sr = s + (r0 + r) * stride;
      const int64_t visible = seen[r0 + r];
      VF vmax = hn::Set(df, kNoScore);
      for (int64_t j = 0; j < visible; j += N) {
        const auto mask = hn::FirstN(df, size_t(visible - j));
        vmax = hn::Max(vmax, hn::IfThenElse(mask, hn::LoadU(df, sr + j), vmax));
      }
      m_old[r] = m[r0 + r];
      m_new[r] = std::max(m_old[r], hn::GetLane(hn::MaxOfLanes(df, vmax)));
    }
    // 0 on a row's first visible tile (m = kNoScore), 1 where no key is visible. One row (the
    // decoders over codes, one key per tile in cpu.streaming) takes the scalar exp.
    if (count == 1) {
      c[0] = std::exp(m_old[0] - m_new[0]);
    } else {
      hn::Store(hn::Exp(df, hn::Sub(hn::Load(df, m_old), hn::Load(df, m_new))), df, c);
    }
    for (int64_t r = 0; r < count; ++r) {
      float* HWY_RESTRICT sr = s + (r0 + r) * stride;
      const int64_t visible = seen[r0 + r];
      const VF mv = hn::Set(df, m_new[r]);
      VF sum = hn::Zero(df);
      for (int64_t j = 0; j < n; j += N) {
        const VF e = hn::Exp(df, hn::Min(hn::Sub(hn::LoadU(df, sr + j), mv), hn::Zero(df)));
        const VF p = hn::IfThenElseZero(hn::FirstN(df, size_t(std::max<int64_t>(0, visible - j))), e);
        hn::StoreU(p, df, sr + j);
        sum = hn::Add(sum, p);
      }
      corr[r0 + r] = c[r];
      l[r0 + r] = l[r0 + r] * c[r] + hn::GetLane(hn::SumOfLanes(df, sum));
      m[r0 + r] = m_new[r];
    }
  }
}

// SoftmaxRows for one row.
HWY_INLINE void SoftmaxRow(float* HWY_RESTRICT s, int64_t seen, int64_t n, float& m, float& l, float& corr) {
  SoftmaxRows(s, 0, 1, &seen, n, &m, &l, &corr);
}

// A task's partial state in the split-K buffer: m [rows], l [rows], acc [rows][d].
struct PartialSlot {
  float* base;
  int64_t max_rows, d;
  float* m() const { return base; }
  float* l() const { return base + max_rows; }
  float* acc(int64_t r) const { return base + 2 * max_rows + r * d; }
};

// Row r of `splits` consecutive partial states merged by log-sum-exp, in split order:
// acc = sum_s w_s acc_s with w_s = exp(m_s - max_s m_s); returns sum_s w_s l_s (acc / it is the row's
// softmax average).
HWY_INLINE float MergeRow(const PartialSlot* slots, int64_t splits, int64_t r, float* HWY_RESTRICT acc) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df)), d = slots[0].d;
  float m = kNoScore, l = 0.0f;
  for (int64_t s = 0; s < splits; ++s) m = std::max(m, slots[s].m()[r]);
  std::fill(acc, acc + d, 0.0f);
  for (int64_t s = 0; s < splits; ++s) {
    const float w = std::exp(slots[s].m()[r] - m);
    l += w * slots[s].l()[r];
    const VF wv = hn::Set(df, w);
    for (int64_t c = 0; c < d; c += N) {
      hn::StoreU(hn::MulAdd(wv, hn::LoadU(df, slots[s].acc(r) + c), hn::LoadU(df, acc + c)), df, acc + c);
    }
  }
  return l;
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // DECODELAB_CPU_ATTENTION_TILES_INL_H_
