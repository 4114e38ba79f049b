// CPU scaled dot-product attention (Vaswani et al. 2017) for prefill and for queries over
// contiguous and paged KV caches, with the one-pass online softmax (Milakov & Gimelshein 2018) as
// in FlashAttention (Dao et al. 2022) and split-K decode as in Flash-Decoding (Dao et al. 2023).
//
// The work is cut into row sets: the query rows that share one KV head (positions x G heads of a
// GQA group), so that every K/V row fetched serves all of them. A task runs one row set over one
// range of keys, tile by tile, keeping a running (max, sum, accumulator) per row in f32. When a
// row set's keys are split over several tasks (split-K, for decode, where B * Hkv alone does not
// feed the threads), the partial states are merged by log-sum-exp in split order. Split points
// depend on the shape only, never on the thread count, so results are the same bits every run.
//
// Two tile kernels, chosen by how many rows a task has:
//  - DotTile (few rows: decode): K rows, widened in registers, are dotted with up to 4 query rows
//    held in registers, a vector of scores at a time (N / rows keys, one transpose-and-add tree
//    for the N sums); V rows are streamed once per block of 4 rows. Decode is memory-bound: K and
//    V are read once, straight from the cache; where the heads of a token are adjacent (a paged
//    cache), the tasks of all KV heads over one key range run together, so pages are read whole.
//  - LaneTile (many rows: prefill): query rows across SIMD lanes; the K/V tile is widened to f32
//    (sized to L1) and its elements broadcast, so scores and P.V are register-blocked FMAs with no
//    horizontal sums, and the softmax runs across lanes. Prefill is compute-bound.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/attention.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/cache_control.h"
#include "hwy/contrib/math/math-inl.h"
#include "cpu/simd.h"
#include "cpu/attention_tiles-inl.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/attention.h"
#include "cpu/element.h"
#include "cpu/thread_pool.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// DotTile: keys per tile. LaneTile: query rows per task.
// DotTile keys: 16, a page of the default paged cache. Its K and V rows (8 KiB in f16 at D = 128)
// and the next tile's, prefetched meanwhile, stay well inside L1; 64-key tiles spend less per tile
// but, from DRAM, lose more to the prefetched tile evicting the current one.
constexpr int64_t kDotTileKeys = 16;
constexpr int64_t kLaneRows = 64;

// LaneTile keys per tile: the f32 K and V tiles take 32 KiB together, the L1 data cache.
int64_t LaneTileKeys(int64_t d) { return std::clamp<int64_t>(4096 / d / 4 * 4, 16, 64); }

// ---- Where K and V live. rows() fills the row pointers of tokens [t0, t0 + n) of sequence b,
// KV head h; it never touches a token at or past the length, nor a page past those covering it.

// Prefill K, V: [B, Skv, Hkv, D].
template <class T>
struct PrefillKV {
  static constexpr bool kHeadsAdjacent = true;
  const T* k;
  const T* v;
  int64_t tokens, heads, d;
  int64_t length(int64_t) const { return tokens; }
  void rows(int64_t b, int64_t h, int64_t t0, int64_t n, const T** k_rows, const T** v_rows) const {
    const int64_t at = ((b * tokens + t0) * heads + h) * d, stride = heads * d;
    for (int64_t j = 0; j < n; ++j) {
      k_rows[j] = k + at + j * stride;
      v_rows[j] = v + at + j * stride;
    }
  }
};

// Contiguous cache K, V: [B, Hkv, S_max, D] and lengths.
template <class T>
struct CacheKV {
  static constexpr bool kHeadsAdjacent = false;
  const T* k;
  const T* v;
  const int32_t* lengths;
  int64_t heads, capacity, d;
  int64_t length(int64_t b) const { return lengths[b]; }
  void rows(int64_t b, int64_t h, int64_t t0, int64_t n, const T** k_rows, const T** v_rows) const {
    const int64_t at = ((b * heads + h) * capacity + t0) * d;
    for (int64_t j = 0; j < n; ++j) {
      k_rows[j] = k + at + j * d;
      v_rows[j] = v + at + j * d;
    }
  }
};

// Paged cache: pools [num_pages, page_size, Hkv, D], page_table [B, max_pages], lengths. The
// page table is walked forward from t0: one division per tile, not per token.
template <class T>
struct PagedCacheKV {
  static constexpr bool kHeadsAdjacent = true;
  const T* k;
  const T* v;
  const int32_t* lengths;
  const int32_t* page_table;
  int64_t max_pages, page_size, heads, d;
  int64_t length(int64_t b) const { return lengths[b]; }
  void rows(int64_t b, int64_t h, int64_t t0, int64_t n, const T** k_rows, const T** v_rows) const {
    const int32_t* pages = page_table + b * max_pages;
    int64_t page = t0 / page_size, slot = t0 % page_size;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t at = ((int64_t(pages[page]) * page_size + slot) * heads + h) * d;
      k_rows[j] = k + at;
      v_rows[j] = v + at;
      if (++slot == page_size) {
        slot = 0;
        ++page;
      }
    }
  }
};

// One call: q, out = [B, Sq, Hq, D] and the keys and values in `kv`.
template <class T, class KV>
struct Problem {
  const T* q;
  T* out;
  KV kv;
  int64_t batch, sq, hq, hkv, d;
  bool causal;
  float scale;
  int64_t group() const { return hq / hkv; }
  // Keys that query position i of sequence b sees: causal aligns the last query with the last key.
  int64_t visible(int64_t b, int64_t i) const {
    const int64_t length = kv.length(b);
    return causal ? std::min(length, i + 1 + length - sq) : length;
  }
};

// ---- The plan: row sets and the tasks over their keys.

struct Plan {
  bool lanes;           // LaneTile, else DotTile
  bool one_head;        // a row set holds one query head rather than the G heads of a KV head
  int64_t positions;    // query positions per row set
  int64_t tile;         // keys per tile
  int64_t max_splits;   // split-K: most tasks per row set
  // DotTile: the tasks of one split of every KV head's row set run as one work item, tile by
  // tile, so that where the heads of a token are adjacent in memory (a paged cache) each page is
  // read whole, in order, rather than a 1/Hkv slice of every page per task.
  bool heads_together;
};

// Positions [i_begin, i_end) x heads [g_begin, g_end) of the group of KV head kv_head; row r is
// position i_begin + r / heads(), head g_begin + r % heads(), so visible keys never decrease with r.
struct RowSet {
  int64_t b, kv_head, i_begin, i_end, g_begin, g_end;
  int64_t splits = 1;
  int64_t first_task = 0;
  int64_t heads() const { return g_end - g_begin; }
  int64_t rows() const { return (i_end - i_begin) * heads(); }
};

struct Task {
  int64_t set;
  int64_t t_begin, t_end;  // keys
};

template <class T, class KV>
Plan MakePlan(const Problem<T, KV>& p, AttentionVariant variant) {
  const DF df;
  const int64_t group = p.group(), lanes = int64_t(hn::Lanes(df));
  const int64_t lane_positions = std::min(p.sq, std::max<int64_t>(1, kLaneRows / group));
  switch (variant) {
    case AttentionVariant::streaming: return {false, true, 1, 1, 1, false};
    case AttentionVariant::row_parallel: return {false, false, 1, kDotTileKeys, 1, false};
    case AttentionVariant::tiled: return {true, false, lane_positions, LaneTileKeys(p.d), 1, false};
    default: break;
  }
  // Enough rows to fill the lanes: query tiles. Otherwise all positions at once, split-K.
  Plan plan = p.sq * group >= lanes ? Plan{true, false, lane_positions, LaneTileKeys(p.d), 1, false}
                                    : Plan{false, false, p.sq, kDotTileKeys, 1, KV::kHeadsAdjacent};
  const int64_t sets = p.batch * p.hkv * DivCeil(p.sq, plan.positions);
  plan.max_splits = MaxSplits(sets);
  return plan;
}

// Row sets in order of decreasing work (later causal positions see more keys), so the pool's
// dynamic hand-out balances; each set's splits are consecutive tasks of tile-aligned key ranges.
template <class T, class KV>
void MakeTasks(const Problem<T, KV>& p, const Plan& plan, std::vector<RowSet>& sets, std::vector<Task>& tasks) {
  const int64_t heads = plan.one_head ? 1 : p.group();
  for (int64_t block = DivCeil(p.sq, plan.positions) - 1; block >= 0; --block) {
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t h = 0; h < p.hkv; ++h) {
        for (int64_t g = 0; g < p.group(); g += heads) {
          RowSet set{b, h, block * plan.positions, std::min(p.sq, (block + 1) * plan.positions), g, g + heads};
          const int64_t keys = p.visible(b, set.i_end - 1);
          const int64_t chunk = SplitKeys(keys, plan.max_splits, plan.tile);
          set.splits = DivCeil(keys, chunk);
          set.first_task = int64_t(tasks.size());
          for (int64_t s = 0; s < set.splits; ++s) {
            tasks.push_back({int64_t(sets.size()), s * chunk, std::min(keys, (s + 1) * chunk)});
          }
          sets.push_back(set);
        }
      }
    }
  }
}

// ---- Per-row state of a task, f32: the query (pre-scaled), the keys it sees, and the running
// softmax: max m, sum l of exp(score - m), and accumulator acc = sum exp(score - m) * v.
struct RowState {
  std::vector<float> q, m, l, acc;  // q, acc: [rows, d]
  std::vector<int64_t> limit;
};

template <class T, class KV>
RowState LoadRows(const Problem<T, KV>& p, const RowSet& set) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df)), rows = set.rows(), d = p.d;
  const VF scale = hn::Set(df, p.scale);
  RowState st;
  st.q.resize(size_t(RoundUp(rows, 4) * d));  // zero rows pad DotBatch's blocks of 4
  st.m.assign(size_t(rows), kNoScore);
  st.l.assign(size_t(rows), 0.0f);
  st.acc.assign(size_t(rows * d), 0.0f);
  st.limit.resize(size_t(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = set.i_begin + r / set.heads();
    const int64_t head = set.kv_head * p.group() + set.g_begin + r % set.heads();
    const T* q = p.q + ((set.b * p.sq + i) * p.hq + head) * d;
    for (int64_t c = 0; c < d; c += N) hn::StoreU(hn::Mul(LoadF32(df, q + c), scale), df, st.q.data() + r * d + c);
    st.limit[size_t(r)] = p.visible(set.b, i);
  }
  return st;
}

// out row = acc / l, rounded once to T.
template <class T>
void StoreRow(const float* HWY_RESTRICT acc, float l, int64_t d, T* HWY_RESTRICT out) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df));
  const auto inv = hn::Set(df, 1.0f / l);
  for (int64_t c = 0; c < d; c += N) StoreF32(df, hn::Mul(hn::LoadU(df, acc + c), inv), out + c);
}

template <class T, class KV>
T* OutputRow(const Problem<T, KV>& p, const RowSet& set, int64_t r) {
  const int64_t i = set.i_begin + r / set.heads();
  const int64_t head = set.kv_head * p.group() + set.g_begin + r % set.heads();
  return p.out + ((set.b * p.sq + i) * p.hq + head) * p.d;
}

// ---- DotTile: few rows; K and V read straight from their rows, widened in registers (the tile
// arithmetic, DotKeys, SoftmaxRow and AccumulateRows, is in attention_tiles-inl.h).

// Requests the cache lines of a row of `bytes` bytes at p.
HWY_INLINE void PrefetchRow(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) hwy::Prefetch(c + i);
  hwy::Prefetch(c + bytes - 1);  // the last line, when rows are not line-aligned
}

// The K and V rows of the tile being computed and of the next one. The lines of the rows that
// are computed next (by default the next tile) are requested while this tile computes, spread
// over its keys: page-table reads leave the hardware prefetcher nothing to follow, and
// contiguous rows gain from the head start too.
template <class T>
struct TileRows {
  explicit TileRows(int64_t tile)
      : k(static_cast<size_t>(tile)), v(k.size()), next_k(k.size()), next_v(k.size()) {}
  // Makes [t0, t0 + n) current, where the previous call's next tile was [t0, ...) (or fetches
  // it on the first call), and [t0 + n, t0 + n + next_n) next.
  template <class KV>
  void advance(const KV& kv, int64_t b, int64_t h, int64_t t0, int64_t n, int64_t next_n) {
    count = n;
    if (next_count == 0) {
      kv.rows(b, h, t0, n, k.data(), v.data());
    } else {
      std::swap(k, next_k);
      std::swap(v, next_v);
    }
    next_count = next_n;
    if (next_n > 0) kv.rows(b, h, t0 + n, next_n, next_k.data(), next_v.data());
    fetch(*this, true);
  }
  // Prefetch, while this tile computes, the current (next = false) or next tile of `rows`.
  void fetch(const TileRows& rows, bool next) {
    fetch_k = next ? rows.next_k.data() : rows.k.data();
    fetch_v = next ? rows.next_v.data() : rows.v.data();
    fetch_count = next ? rows.next_count : rows.count;
  }
  // Prefetches keys [j0, j1) (those that exist) of the rows to fetch. Inlined early on purpose:
  // GCC deems a function whose only effect is prefetching "const" and deletes calls to it.
  HWY_INLINE void prefetch(int64_t j0, int64_t j1, int64_t row_bytes) const {
    for (int64_t j = j0; j < std::min(j1, fetch_count); ++j) {
      PrefetchRow(fetch_k[size_t(j)], row_bytes);
      PrefetchRow(fetch_v[size_t(j)], row_bytes);
    }
  }
  std::vector<const T*> k, v, next_k, next_v;
  int64_t count = 0, next_count = 0;
  const T* const* fetch_k = nullptr;
  const T* const* fetch_v = nullptr;
  int64_t fetch_count = 0;
};

// All keys of a tile for kRows rows. On fixed-size SIMD targets, a vector of scores at a time
// (DotBatch: N / kRows keys, one horizontal tree for N scores; kRows = 3 runs as 4 over a padded
// zero row), then the keys left one at a time; elsewhere with one row 4 keys at a time, so that
// sums still come in fours. The rows to fetch are prefetched alongside when `prefetch`.
template <int kRows, class T>
HWY_INLINE void DotRows(const float* HWY_RESTRICT q, int64_t d, const TileRows<T>& rows, bool prefetch, int64_t n,
                        float* HWY_RESTRICT s, int64_t stride) {
  const int64_t row_bytes = d * int64_t(sizeof(T));
  int64_t j = 0;
#ifdef DECODELAB_ATTENTION_DOT_BATCH
  constexpr int kBatchRows = kRows == 3 ? 4 : kRows;
  constexpr int64_t kKeys = BatchKeys<kBatchRows>();
  for (; j + kKeys <= n; j += kKeys) {
    if (prefetch) rows.prefetch(j, j + kKeys, row_bytes);
    DotBatch<kBatchRows>(q, d, rows.k.data() + j, s + j, stride);
  }
#else
  constexpr int kKeys = kRows == 1 ? 4 : 2;
  for (; j + kKeys <= n; j += kKeys) {
    if (prefetch) rows.prefetch(j, j + kKeys, row_bytes);
    DotKeys<kRows, kKeys>(q, d, rows.k.data() + j, s + j, stride);
  }
#endif
  for (; j < n; ++j) {
    if (prefetch) rows.prefetch(j, j + 1, row_bytes);
    DotKeys<kRows, 1>(q, d, rows.k.data() + j, s + j, stride);
  }
}

// One task of DotTile, a tile at a time: its rows' running state, the tile's scores (rows padded
// to a multiple of 4, keys to a multiple of N) and the K/V rows of this tile and the next.
template <size_t kD, class T, class KV>
struct DotTask {
  DotTask(const Problem<T, KV>& problem, int64_t tile_keys, const RowSet& row_set, const Task& range)
      : p(problem),
        set(row_set),
        task(range),
        tile(tile_keys),
        d(kD ? int64_t(kD) : p.d),
        rows(set.rows()),
        stride(RoundUp(tile, int64_t(hn::Lanes(DF())))),
        st(LoadRows(p, set)),
        scores(static_cast<size_t>(RoundUp(rows, 4) * stride)),
        corr(static_cast<size_t>(rows)),
        seen(static_cast<size_t>(rows)),
        kv(tile) {}

  // Makes the keys [t0, t0 + tile) of the task's range (fewer at its end) the current tile.
  void advance(int64_t t0) {
    const int64_t n = std::min(tile, task.t_end - t0);
    kv.advance(p.kv, set.b, set.kv_head, t0, n, std::min(tile, task.t_end - t0 - n));
  }

  // Computes the current tile [t0, ...).
  void compute(int64_t t0) {
    const DF df;
    const int64_t N = int64_t(hn::Lanes(df));
    const int64_t n = kv.count;
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      WithBlock(rows - r0, [&](auto kr) {
        DotRows<kr()>(st.q.data() + r0 * d, d, kv, r0 == 0, n, scores.data() + r0 * stride, stride);
      });
    }
    for (int64_t r = 0; r < rows; ++r) seen[size_t(r)] = std::clamp(st.limit[size_t(r)] - t0, int64_t{0}, n);
    SoftmaxRows(scores.data(), stride, rows, seen.data(), n, st.m.data(), st.l.data(), corr.data());
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      WithBlock(rows - r0, [&](auto kr) {
        const float* pr = scores.data() + r0 * stride;
        float* acc = st.acc.data() + r0 * d;
        // Blocks of 4 vectors of the head dimension, then single vectors (D = 96: 4 + 1 + 1).
        for (int64_t c = 0; c < d;) {
          if (d - c >= 4 * N) {
            AccumulateRows<kr(), 4>(pr, stride, corr.data() + r0, kv.v.data(), n, c, acc, d);
            c += 4 * N;
          } else {
            AccumulateRows<kr(), 1>(pr, stride, corr.data() + r0, kv.v.data(), n, c, acc, d);
            c += N;
          }
        }
      });
    }
  }

  const Problem<T, KV>& p;
  const RowSet& set;
  const Task& task;
  int64_t tile, d, rows, stride;
  RowState st;
  std::vector<float> scores, corr;
  std::vector<int64_t> seen;
  TileRows<T> kv;
};

// ---- LaneTile: rows across lanes. Layouts: qt, acc_t [d][width] (row r in lane r of a
// "row vector" of N rows), scores/probabilities s [keys][width], kf, vf [keys][d] in f32.

// Scores of 4 keys (kf rows, stride d) against kRowVecs row vectors: s[j * width + lane].
template <int kRowVecs>
HWY_INLINE void LaneScores(const float* HWY_RESTRICT qt, int64_t width, const float* HWY_RESTRICT kf, int64_t d,
                           float* HWY_RESTRICT s) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df));
  VF a[4][kRowVecs];
  for (int j = 0; j < 4; ++j) {
    for (int v = 0; v < kRowVecs; ++v) a[j][v] = hn::Zero(df);
  }
  for (int64_t c = 0; c < d; ++c) {
    VF q[kRowVecs];
    for (int v = 0; v < kRowVecs; ++v) q[v] = hn::LoadU(df, qt + c * width + v * N);
    for (int j = 0; j < 4; ++j) {
      const VF k = hn::Set(df, kf[j * d + c]);
      for (int v = 0; v < kRowVecs; ++v) a[j][v] = hn::MulAdd(k, q[v], a[j][v]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    for (int v = 0; v < kRowVecs; ++v) hn::StoreU(a[j][v], df, s + j * width + v * N);
  }
}

// acc_t dims [c, c + 4) x kRowVecs row vectors: acc = acc * corr + sum_j vf[j][c] * p[j].
template <int kRowVecs>
HWY_INLINE void LaneAccumulate(const float* HWY_RESTRICT s, int64_t width, const float* HWY_RESTRICT corr,
                               const float* HWY_RESTRICT vf, int64_t d, int64_t n, float* HWY_RESTRICT acc_t) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df));
  VF a[4][kRowVecs];
  for (int v = 0; v < kRowVecs; ++v) {
    const VF cv = hn::LoadU(df, corr + v * N);
    for (int c = 0; c < 4; ++c) a[c][v] = hn::Mul(hn::LoadU(df, acc_t + c * width + v * N), cv);
  }
  for (int64_t j = 0; j < n; ++j) {
    VF p[kRowVecs];
    for (int v = 0; v < kRowVecs; ++v) p[v] = hn::LoadU(df, s + j * width + v * N);
    for (int c = 0; c < 4; ++c) {
      const VF x = hn::Set(df, vf[j * d + c]);
      for (int v = 0; v < kRowVecs; ++v) a[c][v] = hn::MulAdd(x, p[v], a[c][v]);
    }
  }
  for (int c = 0; c < 4; ++c) {
    for (int v = 0; v < kRowVecs; ++v) hn::StoreU(a[c][v], df, acc_t + c * width + v * N);
  }
}

template <size_t kD, class T, class KV>
void LaneTile(const Problem<T, KV>& p, int64_t tile, const RowSet& set, const Task& task, RowState& st) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df));
  const int64_t d = kD ? int64_t(kD) : p.d, rows = set.rows();
  const int64_t width = RoundUp(rows, N), row_vecs = width / N, keys = RoundUp(tile, 4);
  // Padding rows (past `rows`) see no key: their lanes compute harmless zeros and are dropped.
  const auto floats = [](int64_t n) { return std::vector<float>(static_cast<size_t>(n)); };
  std::vector<float> qt = floats(d * width), acc_t = floats(d * width), s = floats(keys * width);
  std::vector<float> kf = floats(keys * d), vf = floats(keys * d);
  std::vector<float> m(static_cast<size_t>(width), kNoScore), l = floats(width), corr = floats(width);
  std::vector<float> limit = floats(width);
  TileRows<T> rows_kv(tile);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < d; ++c) qt[size_t(c * width + r)] = st.q[size_t(r * d + c)];
    limit[size_t(r)] = float(st.limit[size_t(r)]);  // exact: lengths are far below 2^24
  }
  for (int64_t t0 = task.t_begin; t0 < task.t_end; t0 += tile) {
    const int64_t n = std::min(tile, task.t_end - t0);
    rows_kv.advance(p.kv, set.b, set.kv_head, t0, n, std::min(tile, task.t_end - t0 - n));
    for (int64_t j = 0; j < n; ++j) {
      rows_kv.prefetch(j, j + 1, d * int64_t(sizeof(T)));
      for (int64_t c = 0; c < d; c += N) {
        hn::StoreU(LoadF32(df, rows_kv.k[size_t(j)] + c), df, kf.data() + j * d + c);
        hn::StoreU(LoadF32(df, rows_kv.v[size_t(j)] + c), df, vf.data() + j * d + c);
      }
    }
    // Keys past n in the last block of 4 hold stale finite values; their scores are never read.
    for (int64_t v0 = 0; v0 < row_vecs; v0 += 4) {
      WithBlock(row_vecs - v0, [&](auto kv) {
        for (int64_t j0 = 0; j0 < n; j0 += 4) {
          LaneScores<kv()>(qt.data() + v0 * N, width, kf.data() + j0 * d, d, s.data() + j0 * width + v0 * N);
        }
      });
    }
    // Online softmax across lanes; key t0 + j is visible to a row iff t0 + j < its limit.
    for (int64_t v = 0; v < row_vecs; ++v) {
      const VF lim = hn::LoadU(df, limit.data() + v * N);
      float* sv = s.data() + v * N;
      VF mx = hn::Set(df, kNoScore);
      for (int64_t j = 0; j < n; ++j) {
        const auto visible = hn::Lt(hn::Set(df, float(t0 + j)), lim);
        mx = hn::Max(mx, hn::IfThenElse(visible, hn::LoadU(df, sv + j * width), mx));
      }
      const VF m_old = hn::LoadU(df, m.data() + v * N), m_new = hn::Max(m_old, mx);
      VF sum = hn::Zero(df);
      for (int64_t j = 0; j < n; ++j) {
        const auto visible = hn::Lt(hn::Set(df, float(t0 + j)), lim);
        const VF e = hn::Exp(df, hn::Min(hn::Sub(hn::LoadU(df, sv + j * width), m_new), hn::Zero(df)));
        const VF pj = hn::IfThenElseZero(visible, e);
        hn::StoreU(pj, df, sv + j * width);
        sum = hn::Add(sum, pj);
      }
      const VF c = hn::Exp(df, hn::Sub(m_old, m_new));
      hn::StoreU(c, df, corr.data() + v * N);
      hn::StoreU(hn::MulAdd(hn::LoadU(df, l.data() + v * N), c, sum), df, l.data() + v * N);
      hn::StoreU(m_new, df, m.data() + v * N);
    }
    for (int64_t v0 = 0; v0 < row_vecs; v0 += 4) {
      WithBlock(row_vecs - v0, [&](auto kv) {
        for (int64_t c = 0; c < d; c += 4) {
          LaneAccumulate<kv()>(s.data() + v0 * N, width, corr.data() + v0 * N, vf.data() + c, d, n,
                               acc_t.data() + c * width + v0 * N);
        }
      });
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < d; ++c) st.acc[size_t(r * d + c)] = acc_t[size_t(c * width + r)];
    st.m[size_t(r)] = m[size_t(r)];
    st.l[size_t(r)] = l[size_t(r)];
  }
}

// ---- Running a plan, and merging split-K partials.

// out = sum_s w_s acc_s / sum_s w_s l_s, the log-sum-exp merge of the set's splits in order.
template <class T, class KV>
void MergeSet(const Problem<T, KV>& p, const RowSet& set, const std::vector<PartialSlot>& slots) {
  std::vector<float> acc(static_cast<size_t>(p.d));
  for (int64_t r = 0; r < set.rows(); ++r) {
    const float l = MergeRow(slots.data() + set.first_task, set.splits, r, acc.data());
    StoreRow(acc.data(), l, p.d, OutputRow(p, set, r));
  }
}

template <size_t kD, class T, class KV>
void Run(const Problem<T, KV>& p, const Plan& plan) {
  std::vector<RowSet> sets;
  std::vector<Task> tasks;
  MakeTasks(p, plan, sets, tasks);
  int64_t max_rows = 0;
  bool split = false;
  for (const RowSet& set : sets) {
    max_rows = std::max(max_rows, set.rows());
    split = split || set.splits > 1;
  }
  const int64_t slot_floats = max_rows * (p.d + 2);
  std::vector<float> partials(split ? tasks.size() * size_t(slot_floats) : 0);
  std::vector<PartialSlot> slots;
  if (split) {
    for (size_t t = 0; t < tasks.size(); ++t) slots.push_back({partials.data() + t * size_t(slot_floats), max_rows, p.d});
  }
  // A finished task's rows: the output, or its partial state for the merge.
  const auto finish = [&](int64_t t, const RowSet& set, const RowState& st) {
    if (set.splits == 1) {
      for (int64_t r = 0; r < set.rows(); ++r) StoreRow(st.acc.data() + r * p.d, st.l[size_t(r)], p.d, OutputRow(p, set, r));
      return;
    }
    const PartialSlot& slot = slots[size_t(t)];
    std::copy(st.m.begin(), st.m.end(), slot.m());
    std::copy(st.l.begin(), st.l.end(), slot.l());
    std::copy(st.acc.begin(), st.acc.end(), slot.acc(0));
  };
  // Work items: tasks first + i * stride for i < count, run together. With heads_together, the
  // Hkv row sets of a (sequence, positions) are consecutive and split alike, so split s of each
  // is `splits` tasks after that of the previous head.
  struct Work {
    int64_t first, count, stride;
  };
  std::vector<Work> work;
  if (plan.heads_together) {
    for (size_t s0 = 0; s0 < sets.size(); s0 += size_t(p.hkv)) {
      for (int64_t s = 0; s < sets[s0].splits; ++s) work.push_back({sets[s0].first_task + s, p.hkv, sets[s0].splits});
    }
  } else {
    for (int64_t t = 0; t < int64_t(tasks.size()); ++t) work.push_back({t, 1, 1});
  }
  ThreadPool::instance().parallel_for(int64_t(work.size()), [&](int64_t w) {
    const Work& item = work[size_t(w)];
    if (plan.lanes) {
      const Task& task = tasks[size_t(item.first)];
      const RowSet& set = sets[size_t(task.set)];
      RowState st = LoadRows(p, set);
      LaneTile<kD>(p, plan.tile, set, task, st);
      finish(item.first, set, st);
      return;
    }
    std::vector<DotTask<kD, T, KV>> dots;
    dots.reserve(size_t(item.count));
    for (int64_t i = 0; i < item.count; ++i) {
      const Task& task = tasks[size_t(item.first + i * item.stride)];
      dots.emplace_back(p, plan.tile, sets[size_t(task.set)], task);
    }
    const Task& range = tasks[size_t(item.first)];  // every task of the item has these keys
    for (int64_t t0 = range.t_begin; t0 < range.t_end; t0 += plan.tile) {
      for (DotTask<kD, T, KV>& dot : dots) dot.advance(t0);
      // Heads together: while one head computes, the next head's rows of this tile (adjacent to
      // its own) are fetched, and the last head fetches the first head's next tile.
      for (size_t i = 0; i + 1 < dots.size(); ++i) dots[i].kv.fetch(dots[i + 1].kv, false);
      if (dots.size() > 1) dots.back().kv.fetch(dots.front().kv, true);
      for (DotTask<kD, T, KV>& dot : dots) dot.compute(t0);
    }
    for (int64_t i = 0; i < item.count; ++i) finish(item.first + i * item.stride, dots[size_t(i)].set, dots[size_t(i)].st);
  });
  if (split) {
    ThreadPool::instance().parallel_for(int64_t(sets.size()), [&](int64_t s) {
      if (sets[size_t(s)].splits > 1) MergeSet(p, sets[size_t(s)], slots);
    });
  }
}

template <class T, class KV>
void RunVariant(const Problem<T, KV>& p, AttentionVariant variant) {
  const Plan plan = MakePlan(p, variant);
  const int64_t d = attention_head_dim(variant);
  if (d != 0 && d != p.d) fail("cpu attention", "D", std::to_string(d), std::to_string(p.d));
  if (d == 64) {
    Run<64>(p, plan);
  } else if (d == 128) {
    Run<128>(p, plan);
  } else {
    Run<0>(p, plan);
  }
}

template <class T, class KV>
Problem<T, KV> MakeProblem(const Tensor& q, const Tensor& out, const AttentionOptions& o, const KV& kv, int64_t hkv) {
  return {q.ptr<const T>(), out.ptr<T>(), kv, q.dim(0), q.dim(1), q.dim(2), hkv, q.dim(3), o.causal, o.scale};
}

void PrefillAttention(const PrefillAttentionArgs& a, AttentionVariant variant) {
  dispatch_activation(a.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    const PrefillKV<T> kv{a.k.ptr<const T>(), a.v.ptr<const T>(), a.k.dim(1), a.k.dim(2), a.k.dim(3)};
    RunVariant(MakeProblem<T>(a.q, a.out, a.options, kv, a.k.dim(2)), variant);
  });
}

void DecodeAttention(const DecodeAttentionArgs& a, AttentionVariant variant) {
  dispatch_activation(a.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    const ContiguousKV& c = a.cache;
    const CacheKV<T> kv{c.k.ptr<const T>(), c.v.ptr<const T>(), c.lengths.ptr<const int32_t>(), c.k.dim(1), c.k.dim(2),
                        c.k.dim(3)};
    RunVariant(MakeProblem<T>(a.q, a.out, a.options, kv, c.k.dim(1)), variant);
  });
}

void DecodeAttentionPaged(const DecodeAttentionPagedArgs& a, AttentionVariant variant) {
  dispatch_activation(a.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    const PagedKV& c = a.cache;
    const PagedCacheKV<T> kv{c.k_pages.ptr<const T>(), c.v_pages.ptr<const T>(), c.lengths.ptr<const int32_t>(),
                             c.page_table.ptr<const int32_t>(), c.page_table.dim(1), c.k_pages.dim(1),
                             c.k_pages.dim(2), c.k_pages.dim(3)};
    RunVariant(MakeProblem<T>(a.q, a.out, a.options, kv, c.k_pages.dim(2)), variant);
  });
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace decodelab::cpu {

HWY_EXPORT(PrefillAttention);
HWY_EXPORT(DecodeAttention);
HWY_EXPORT(DecodeAttentionPaged);

void prefill_attention(const PrefillAttentionArgs& a, AttentionVariant v) { HWY_DYNAMIC_DISPATCH(PrefillAttention)(a, v); }
void decode_attention(const DecodeAttentionArgs& a, AttentionVariant v) { HWY_DYNAMIC_DISPATCH(DecodeAttention)(a, v); }
void decode_attention_paged(const DecodeAttentionPagedArgs& a, AttentionVariant v) {
  HWY_DYNAMIC_DISPATCH(DecodeAttentionPaged)(a, v);
}

}  // namespace decodelab::cpu
#endif  // HWY_ONCE
