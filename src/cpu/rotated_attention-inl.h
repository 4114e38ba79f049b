// The fused decode attention that CPU kernels over rotating codecs share (turboquant_attention.cpp,
// rabitq_attention.cpp, qjl_attention.cpp): keys scored in their codec's rotated (or projected)
// domain and values summed in theirs, straight from the codes.
//
// Both codecs store a record as a few per-token numbers and codes of the rotated direction, so with
// q' = R_K q, <q, x~_K> = f_K * sum_j q'_j e_K[code_j] and sum_t p_t x~_V,t = R_V^T sum_t p_t f_V,t
// e_V[code_t], where e[code] is a record's expanded row (TurboQuant: its centroids; RaBitQ: its
// grid point y) and f its factor (TurboQuant: n s; RaBitQ: n / (||y|| <o_bar, o>)). So each query
// head is rotated once, every token costs an expansion of its codes (no rotation, no decoded
// cache), and the output is rotated back once per head. QJL keys fit the same form with the
// rotation replaced by the m x D sketch S: <q, k>^ = f_K * sum_i (S q)_i e_K[sign_i], so a key's
// row has the sketch's m entries instead of D (ProjectedDecodeAttention). A key side is any type with
//   void Prefetch(int64_t index); float Expand(int64_t index, int64_t d, float* row);
//   bool Valid(int64_t index); void CheckRecord(check, pool name, b, t, h)  (fails if invalid),
// the value side is TurboQuant's (TurboQuantCodes).
//
// Work: one task per (sequence, KV head, key range). A task reads each K and V record of its range
// once for all G query heads of the GQA group: a tile of 64 tokens has its records expanded into
// f32 rows (64 x D floats for K and as many for V, in L1 and L2; never a dequantized cache) while
// the next tile's records are prefetched, then runs the f16 decode kernel's tile arithmetic
// (attention_tiles-inl.h): DotKeys for the scores, SoftmaxRow for the online softmax,
// AccumulateRows for the value sum; the per-token factors scale the scores and the probabilities.
// Split-K partial states are merged by log-sum-exp in split order (MergeRow), with split points
// from the shape alone, so results are the same bits every run.
//
// Phases: (1) rotate and pre-scale every query head; (2) the tasks; (3) per query head, merge its
// splits and rotate the mean back. Rotations run in double through the codecs' own Rotation.
// Include it after attention_tiles-inl.h and expand_codes-inl.h inside a file compiled once per
// target (foreach_target.h).
#if defined(DECODELAB_CPU_ROTATED_ATTENTION_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef DECODELAB_CPU_ROTATED_ATTENTION_INL_H_
#undef DECODELAB_CPU_ROTATED_ATTENTION_INL_H_
#else
#define DECODELAB_CPU_ROTATED_ATTENTION_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <span>
#include <utility>
#include <vector>

#include "cpu/attention_tiles-inl.h"
#include "cpu/element.h"
#include "cpu/expand_codes-inl.h"
#include "cpu/thread_pool.h"
#include "decodelab/kvquant.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "kvquant/record.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Tokens per tile; split-K as the f16 decode kernel (attention_tiles-inl.h).
constexpr int64_t kRotatedTileKeys = 64;

// ||row||^2 of d floats.
HWY_INLINE float SquaredNorm(const float* HWY_RESTRICT row, int64_t d) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df));
  VF sum = hn::Zero(df);
  for (int64_t c = 0; c < d; c += N) {
    const VF x = hn::LoadU(df, row + c);
    sum = hn::MulAdd(x, x, sum);
  }
  return hn::GetLane(hn::SumOfLanes(df, sum));
}

// Asks for the record of `bytes` bytes at `record` (it may straddle two cache lines).
HWY_INLINE void PrefetchRecord(const uint8_t* record, int64_t bytes) {
  hwy::Prefetch(record);
  hwy::Prefetch(record + bytes - 1);
}

// One side (keys or values) of a TurboQuant (MSE) pool as the kernels read it. A split width
// (high_bits_channels = h > 0, kvquant.h) is two runs of indices, the first h at bits + 1 with
// their own codebook, each expanded by its width's routine (h and D - h multiples of 16: the
// record checks refuse other splits).
struct TurboQuantCodes {
  using ExpandFn = void (*)(const uint8_t*, const float*, int64_t, float*);
  // One run of indices: `count` coordinates from byte `offset` of the codes.
  struct Run {
    ExpandFn expand = nullptr;
    int64_t offset = 0, count = 0;
    float centroids[16] = {};
  };
  const uint8_t* pages;
  int64_t record_bytes;
  bool norm_corrected;
  Run runs[2];  // the high-width run first (empty at an integer width), then the `bits` run

  static ExpandFn expand_for(int bits) {
    return bits == 1 ? ExpandCentroids<1> : bits == 2 ? ExpandCentroids<2> : bits == 3 ? ExpandCentroids<3> : ExpandCentroids<4>;
  }
  static void set_run(Run& run, const kvquant::Codebook& codebook, int bits, int64_t offset, int64_t count) {
    run.expand = expand_for(bits);
    run.offset = offset;
    run.count = count;
    const auto c = codebook.centroids();
    for (size_t i = 0; i < c.size(); ++i) run.centroids[i] = float(c[i]);
  }

  TurboQuantCodes(const Tensor& pool, const kvquant::TurboQuantMse& codec)
      : pages(pool.ptr<const uint8_t>()),
        record_bytes(codec.record_bytes()),
        norm_corrected(codec.config().scale == kvquant::ScaleMode::norm_corrected) {
    const int bits = codec.config().bits;
    const int64_t d = codec.config().head_dim, h = codec.config().high_bits_channels;
    if (h > 0) set_run(runs[0], *codec.high_codebook(), bits + 1, 0, h);
    set_run(runs[1], codec.codebook(), bits, h * (bits + 1) / 8, d - h);
  }

  float Norm(int64_t index) const { return detail::load_f32_le(pages + index * record_bytes); }
  bool Valid(int64_t index) const { return detail::is_valid_norm(Norm(index)); }
  void Prefetch(int64_t index) const { PrefetchRecord(pages + index * record_bytes, record_bytes); }

  void CheckRecord(const detail::ArgCheck& check, const char* pool, int64_t b, int64_t t, int64_t h,
                   int64_t index) const {
    if (!Valid(index)) detail::fail_paged_record_norm(check, pool, b, t, h, Norm(index));
  }

  // Expands record `index` into row (d floats) and returns its factor n * s (s finite and
  // positive; n * s may overflow for a norm near FLT_MAX, norm-corrected, where the output then
  // overflows too).
  HWY_INLINE float Expand(int64_t index, int64_t d, float* HWY_RESTRICT row) const {
    const uint8_t* codes = pages + index * record_bytes + detail::kNormBytes;
    int64_t at = 0;
    for (const Run& run : runs) {
      if (run.count == 0) continue;
      run.expand(codes + run.offset, run.centroids, run.count, row + at);
      at += run.count;
    }
    const float norm = Norm(index);
    // Never 0: a symmetric codebook has no centroid at 0.
    return norm_corrected ? norm / std::sqrt(SquaredNorm(row, d)) : norm;
  }
};

template <class KeyCodes>
struct RotatedProblem {
  const int32_t* lengths;
  const int32_t* page_table;
  int64_t max_pages, page_size;
  int64_t batch, hq, hkv, d;
  int64_t dk;  // a key row's and a projected query's width: d, or QJL's m
  KeyCodes k;
  TurboQuantCodes v;
  int64_t group() const { return hq / hkv; }
  int64_t record(int64_t b, int64_t h, int64_t t) const {
    return (int64_t(page_table[b * max_pages + t / page_size]) * page_size + t % page_size) * hkv + h;
  }
};

// One task: the G rotated query rows q [G][dk] (pre-scaled) over its keys, into `slot`. Returns
// whether every record it read was valid (a corrupt one makes the slot NaN).
template <class KeyCodes>
bool RunRotatedTask(const RotatedProblem<KeyCodes>& p, const DecodeTask& task, const float* HWY_RESTRICT q,
                    const PartialSlot& slot) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df));
  constexpr int64_t kTile = kRotatedTileKeys;
  const int64_t d = p.d, dk = p.dk, rows = p.group(), stride = RoundUp(kTile, N);
  std::vector<float> k_rows(static_cast<size_t>(kTile * dk)), v_rows(static_cast<size_t>(kTile * d));
  std::vector<const float*> k_ptrs(static_cast<size_t>(kTile)), v_ptrs(k_ptrs.size());
  for (int64_t j = 0; j < kTile; ++j) {
    k_ptrs[size_t(j)] = k_rows.data() + j * dk;
    v_ptrs[size_t(j)] = v_rows.data() + j * d;
  }
  std::vector<float> k_factor(static_cast<size_t>(kTile)), v_factor(k_factor.size());
  std::vector<float> scores(static_cast<size_t>(rows * stride)), corr(static_cast<size_t>(rows));
  float* m = slot.m();
  float* l = slot.l();
  float* acc = slot.acc(0);
  std::fill(m, m + rows, kNoScore);
  std::fill(l, l + rows, 0.0f);
  std::fill(acc, acc + rows * d, 0.0f);
  const int32_t* pages = p.page_table + task.b * p.max_pages;
  bool records_valid = true;
  for (int64_t t0 = task.t_begin; t0 < task.t_end; t0 += kTile) {
    const int64_t n = std::min(kTile, task.t_end - t0);
    // The next tile's records, asked for now: a task reads one KV head's records, Hkv records
    // apart and page after page, which the hardware prefetchers do not follow far enough ahead.
    for (int64_t t = t0 + n; t < std::min(task.t_end, t0 + n + kTile); ++t) {
      const int64_t index = p.record(task.b, task.h, t);
      p.k.Prefetch(index);
      p.v.Prefetch(index);
    }
    // The tile's records, read once for the whole group: page by page, one division per tile.
    int64_t page = t0 / p.page_size, slot_in_page = t0 % p.page_size;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t index = (int64_t(pages[page]) * p.page_size + slot_in_page) * p.hkv + task.h;
      k_factor[size_t(j)] = p.k.Expand(index, dk, k_rows.data() + j * dk);
      v_factor[size_t(j)] = p.v.Expand(index, d, v_rows.data() + j * d);
      // Noted without a branch; the record is named after all tasks ran (FailCorruptRecord).
      records_valid &= p.k.Valid(index) & p.v.Valid(index);
      if (++slot_in_page == p.page_size) {
        slot_in_page = 0;
        ++page;
      }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      WithBlock(rows - r0, [&](auto kr) {
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) DotKeys<kr(), 4>(q + r0 * dk, dk, k_ptrs.data() + j, scores.data() + r0 * stride + j, stride);
        for (; j < n; ++j) DotKeys<kr(), 1>(q + r0 * dk, dk, k_ptrs.data() + j, scores.data() + r0 * stride + j, stride);
      });
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* s = scores.data() + r * stride;
      for (int64_t j = 0; j < n; ++j) s[j] *= k_factor[size_t(j)];
      SoftmaxRow(s, n, n, m[r], l[r], corr[size_t(r)]);
      // l sums the probabilities; the value sum weighs each by its record's factor.
      for (int64_t j = 0; j < n; ++j) s[j] *= v_factor[size_t(j)];
    }
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      WithBlock(rows - r0, [&](auto kr) {
        const float* pr = scores.data() + r0 * stride;
        for (int64_t c = 0; c < d;) {
          if (d - c >= 4 * N) {
            AccumulateRows<kr(), 4>(pr, stride, corr.data() + r0, v_ptrs.data(), n, c, acc + r0 * d, d);
            c += 4 * N;
          } else {
            AccumulateRows<kr(), 1>(pr, stride, corr.data() + r0, v_ptrs.data(), n, c, acc + r0 * d, d);
            c += N;
          }
        }
      });
    }
  }
  return records_valid;
}

// A task saw a corrupt record: the first of its range, keys before values, as the references
// name it (they check in the same order: sequence, KV head, token).
template <class KeyCodes>
[[noreturn]] void FailCorruptRecord(const RotatedProblem<KeyCodes>& p, const DecodeTask& task, const char* op) {
  const detail::ArgCheck check(op);
  for (int64_t t = task.t_begin; t < task.t_end; ++t) {
    const int64_t index = p.record(task.b, task.h, t);
    p.k.CheckRecord(check, "cache.k_pages", task.b, t, task.h, index);
    p.v.CheckRecord(check, "cache.v_pages", task.b, t, task.h, index);
  }
  // Unreachable: the task's flag is set by exactly these checks.
  detail::fail_paged_record_norm(check, "cache", task.b, task.t_begin, task.h, std::nanf(""));
}

// The op for arguments `a` (q, out, options, and a cache with k_pages, v_pages, page_table,
// lengths) whose keys are read through `keys` as rows of key_width floats, scored against each
// query head projected by project(q [D], q' [key_width]) (in double), and whose values are
// TurboQuant records of `v_codec`.
template <class Args, class KeyCodes, class ProjectQuery>
void ProjectedDecodeAttention(const Args& a, const KeyCodes& keys, int64_t key_width, const ProjectQuery& project,
                              const kvquant::TurboQuantMse& v_codec) {
  const auto& c = a.cache;
  const RotatedProblem<KeyCodes> p{c.lengths.template ptr<const int32_t>(),
                                   c.page_table.template ptr<const int32_t>(),
                                   c.page_table.dim(1),
                                   c.k_pages.dim(1),
                                   a.q.dim(0),
                                   a.q.dim(1),
                                   c.k_pages.dim(2),
                                   a.q.dim(2),
                                   key_width,
                                   keys,
                                   TurboQuantCodes(c.v_pages, v_codec)};
  const int64_t d = p.d, dk = p.dk, heads = p.batch * p.hq;
  ThreadPool& pool = ThreadPool::instance();
  dispatch_activation(a.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    // (1) q' = scale * R_K q (or scale * S q) per query head, [B, Hq, dk] f32: the query heads
    // of a KV head are consecutive, so a group's rows are contiguous.
    std::vector<float> rotated(static_cast<size_t>(heads * dk));
    pool.parallel_for(heads, [&](int64_t i) {
      std::vector<double> x(static_cast<size_t>(d)), y(static_cast<size_t>(dk));
      const T* q = a.q.template ptr<const T>() + i * d;
      for (int64_t j = 0; j < d; ++j) x[size_t(j)] = to_f32(q[j]);
      project(std::span<const double>(x), std::span<double>(y));
      for (int64_t j = 0; j < dk; ++j) rotated[size_t(i * dk + j)] = float(y[size_t(j)] * a.options.scale);
    });
    // (2) Every task's partial state.
    std::vector<DecodeTask> tasks;
    std::vector<HeadSplits> kv_heads;
    MakeDecodeTasks(p.lengths, p.batch, p.hkv, kRotatedTileKeys, tasks, kv_heads);
    const int64_t rows = p.group(), slot_floats = rows * (d + 2);
    std::vector<float> partials(tasks.size() * size_t(slot_floats));
    std::vector<PartialSlot> slots;
    for (size_t t = 0; t < tasks.size(); ++t) slots.push_back({partials.data() + t * size_t(slot_floats), rows, d});
    std::vector<uint8_t> records_valid(tasks.size());
    pool.parallel_for(int64_t(tasks.size()), [&](int64_t t) {
      const DecodeTask& task = tasks[size_t(t)];
      records_valid[size_t(t)] =
          RunRotatedTask(p, task, rotated.data() + (task.b * p.hq + task.h * rows) * dk, slots[size_t(t)]);
    });
    for (size_t t = 0; t < tasks.size(); ++t) {
      if (!records_valid[t]) FailCorruptRecord(p, tasks[t], Args::kOp);
    }
    // (3) Per query head: its splits merged, the mean o' rotated back, out = R_V^T o'.
    pool.parallel_for(heads, [&](int64_t i) {
      const int64_t b = i / p.hq, head = i % p.hq;
      const HeadSplits& kv = kv_heads[size_t(b * p.hkv + head / rows)];
      std::vector<float> acc(static_cast<size_t>(d));
      const float l = MergeRow(slots.data() + kv.first_task, kv.splits, head % rows, acc.data());
      std::vector<double> x(static_cast<size_t>(d));
      for (int64_t j = 0; j < d; ++j) x[size_t(j)] = double(acc[size_t(j)]) / double(l);
      v_codec.rotation().apply_inverse(x, x);
      T* out = a.out.template ptr<T>() + i * d;
      for (int64_t j = 0; j < d; ++j) out[j] = from_f32<T>(float(x[size_t(j)]));
    });
  });
}

// Keys in the rotated domain of `k_rotation`: rows of D floats.
template <class Args, class KeyCodes>
void RotatedDecodeAttention(const Args& a, const KeyCodes& keys, const kvquant::Rotation& k_rotation,
                            const kvquant::TurboQuantMse& v_codec) {
  ProjectedDecodeAttention(
      a, keys, a.q.dim(2), [&](std::span<const double> x, std::span<double> y) { k_rotation.apply(x, y); }, v_codec);
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // DECODELAB_CPU_ROTATED_ATTENTION_INL_H_
