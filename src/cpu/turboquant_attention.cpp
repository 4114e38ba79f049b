// CPU fused decode attention over the paged TurboQuant (MSE) cache (turboquant_cache.h): the
// scores and the value sum are computed in the rotated domain, straight from the codes.
//
// A record holds x's norm n and the codebook indices of y = R x / n, so with q' = R_K q,
//   q . x~_K = n s sum_j q'_j c_K[idx_j]      (s = 1, or 1 / ||c_K[idx]|| norm-corrected)
// since R_K is orthogonal, and sum_t p_t x~_V,t = R_V^T sum_t p_t n_t s_t c_V[idx_t]. So each query
// head is rotated once, every token costs an index unpack and centroid lookup per coordinate (no
// rotation, no decoded cache), and the output is rotated back once per head.
//
// Work: one task per (sequence, KV head, key range). A task reads each K and V record of its range
// once for all G query heads of the GQA group: a tile of 64 tokens has its records expanded into
// f32 centroid rows c[idx_j] (64 x D floats for K and as many for V, in L1 and L2; never a
// dequantized cache) while the next tile's records are prefetched, then runs the f16 decode
// kernel's tile arithmetic (attention_tiles-inl.h): DotKeys for the scores, SoftmaxRow for the
// online softmax, AccumulateRows for the value sum; the per-token factors n s scale the scores and
// the probabilities. Split-K partial states are merged by log-sum-exp in split order (MergeRow),
// with split points from the shape alone, so results are the same bits every run.
//
// Phases: (1) rotate and pre-scale every query head; (2) the tasks; (3) per query head, merge its
// splits and rotate the mean back. Rotations run in double through the codec's own Rotation.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/turboquant_attention.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/cache_control.h"
#include "cpu/simd.h"
#include "cpu/attention_tiles-inl.h"
#include "cpu/expand_codes-inl.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/cpu.h"
#include "cpu/element.h"
#include "cpu/thread_pool.h"
#include "kvquant/record.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Tokens per tile; split-K as the f16 decode kernel (attention_tiles-inl.h).
constexpr int64_t kTileKeys = 64;

using ExpandFn = void (*)(const uint8_t*, const float*, int64_t, float*);

// One side (keys or values) as the kernel reads it.
struct Codes {
  const uint8_t* pages;
  int64_t record_bytes;
  bool norm_corrected;
  ExpandFn expand;
  float centroids[16];

  Codes(const Tensor& pool, const kvquant::TurboQuantMse& codec)
      : pages(pool.ptr<const uint8_t>()),
        record_bytes(codec.record_bytes()),
        norm_corrected(codec.config().scale == kvquant::ScaleMode::norm_corrected) {
    const int bits = codec.config().bits;
    expand = bits == 1   ? ExpandCentroids<1>
             : bits == 2 ? ExpandCentroids<2>
             : bits == 3 ? ExpandCentroids<3>
                         : ExpandCentroids<4>;
    const auto c = codec.codebook().centroids();
    std::fill(std::begin(centroids), std::end(centroids), 0.0f);
    for (size_t i = 0; i < c.size(); ++i) centroids[i] = float(c[i]);
  }

  float Norm(int64_t index) const { return detail::load_f32_le(pages + index * record_bytes); }

  // Asks for record `index` (it may straddle two cache lines).
  void Prefetch(int64_t index) const {
    hwy::Prefetch(pages + index * record_bytes);
    hwy::Prefetch(pages + (index + 1) * record_bytes - 1);
  }

  // Expands record `index` into row (d floats) and returns its factor n * s (s finite and
  // positive; n * s may overflow for a norm near FLT_MAX, norm-corrected, where the output then
  // overflows too).
  HWY_INLINE float Expand(int64_t index, int64_t d, float* HWY_RESTRICT row) const {
    expand(pages + index * record_bytes + detail::kNormBytes, centroids, d, row);
    const float norm = Norm(index);
    if (!norm_corrected) return norm;
    const DF df;
    const int64_t N = int64_t(hn::Lanes(df));
    VF sum = hn::Zero(df);
    for (int64_t c = 0; c < d; c += N) {
      const VF x = hn::LoadU(df, row + c);
      sum = hn::MulAdd(x, x, sum);
    }
    // Never 0: a symmetric codebook has no centroid at 0.
    return norm / std::sqrt(hn::GetLane(hn::SumOfLanes(df, sum)));
  }
};

struct Problem {
  const int32_t* lengths;
  const int32_t* page_table;
  int64_t max_pages, page_size;
  int64_t batch, hq, hkv, d;
  Codes k, v;
  int64_t group() const { return hq / hkv; }
  int64_t record(int64_t b, int64_t h, int64_t t) const {
    return (int64_t(page_table[b * max_pages + t / page_size]) * page_size + t % page_size) * hkv + h;
  }
};

// One task: the G rotated query rows q [G][d] (pre-scaled) over its keys, into `slot`. Returns
// whether every record it read had a valid norm (a corrupt one makes the slot NaN).
bool RunTask(const Problem& p, const DecodeTask& task, const float* HWY_RESTRICT q, const PartialSlot& slot) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df));
  const int64_t d = p.d, rows = p.group(), stride = RoundUp(kTileKeys, N);
  std::vector<float> k_rows(static_cast<size_t>(kTileKeys * d)), v_rows(k_rows.size());
  std::vector<const float*> k_ptrs(static_cast<size_t>(kTileKeys)), v_ptrs(k_ptrs.size());
  for (int64_t j = 0; j < kTileKeys; ++j) {
    k_ptrs[size_t(j)] = k_rows.data() + j * d;
    v_ptrs[size_t(j)] = v_rows.data() + j * d;
  }
  std::vector<float> k_factor(static_cast<size_t>(kTileKeys)), v_factor(k_factor.size());
  std::vector<float> scores(static_cast<size_t>(rows * stride)), corr(static_cast<size_t>(rows));
  float* m = slot.m();
  float* l = slot.l();
  float* acc = slot.acc(0);
  std::fill(m, m + rows, kNoScore);
  std::fill(l, l + rows, 0.0f);
  std::fill(acc, acc + rows * d, 0.0f);
  const int32_t* pages = p.page_table + task.b * p.max_pages;
  bool norms_valid = true;
  for (int64_t t0 = task.t_begin; t0 < task.t_end; t0 += kTileKeys) {
    const int64_t n = std::min(kTileKeys, task.t_end - t0);
    // The next tile's records, asked for now: a task reads one KV head's records, Hkv records
    // apart and page after page, which the hardware prefetchers do not follow far enough ahead.
    for (int64_t t = t0 + n; t < std::min(task.t_end, t0 + n + kTileKeys); ++t) {
      const int64_t index = p.record(task.b, task.h, t);
      p.k.Prefetch(index);
      p.v.Prefetch(index);
    }
    // The tile's records, read once for the whole group: page by page, one division per tile.
    int64_t page = t0 / p.page_size, slot_in_page = t0 % p.page_size;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t index = (int64_t(pages[page]) * p.page_size + slot_in_page) * p.hkv + task.h;
      k_factor[size_t(j)] = p.k.Expand(index, d, k_rows.data() + j * d);
      v_factor[size_t(j)] = p.v.Expand(index, d, v_rows.data() + j * d);
      // Noted without a branch; the record is named after all tasks ran (FailCorruptRecord).
      norms_valid &= detail::is_valid_norm(p.k.Norm(index)) & detail::is_valid_norm(p.v.Norm(index));
      if (++slot_in_page == p.page_size) {
        slot_in_page = 0;
        ++page;
      }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      WithBlock(rows - r0, [&](auto kr) {
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) DotKeys<kr(), 4>(q + r0 * d, d, k_ptrs.data() + j, scores.data() + r0 * stride + j, stride);
        for (; j < n; ++j) DotKeys<kr(), 1>(q + r0 * d, d, k_ptrs.data() + j, scores.data() + r0 * stride + j, stride);
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
  return norms_valid;
}

// A task saw a corrupt record: the first of its range, keys before values, as the reference
// names it (it checks in the same order: sequence, KV head, token).
[[noreturn]] void FailCorruptRecord(const Problem& p, const DecodeTask& task) {
  const detail::ArgCheck check(TurboQuantDecodeAttentionPagedArgs::kOp);
  for (int64_t t = task.t_begin; t < task.t_end; ++t) {
    const int64_t index = p.record(task.b, task.h, t);
    for (const auto& [codes, pool] : {std::pair{&p.k, "cache.k_pages"}, std::pair{&p.v, "cache.v_pages"}}) {
      const float norm = codes->Norm(index);
      if (!detail::is_valid_norm(norm)) detail::fail_paged_record_norm(check, pool, task.b, t, task.h, norm);
    }
  }
  // Unreachable: the task's flag is set by exactly these norms.
  detail::fail_paged_record_norm(check, "cache", task.b, task.t_begin, task.h, std::nanf(""));
}

void TurboQuantDecodeAttentionPaged(const TurboQuantDecodeAttentionPagedArgs& a) {
  const PagedTurboQuantKV& c = a.cache;
  const Problem p{c.lengths.ptr<const int32_t>(),
                  c.page_table.ptr<const int32_t>(),
                  c.page_table.dim(1),
                  c.k_pages.dim(1),
                  a.q.dim(0),
                  a.q.dim(1),
                  c.k_pages.dim(2),
                  a.q.dim(2),
                  Codes(c.k_pages, *c.k_codec),
                  Codes(c.v_pages, *c.v_codec)};
  const int64_t d = p.d, heads = p.batch * p.hq;
  ThreadPool& pool = ThreadPool::instance();
  dispatch_activation(a.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    // (1) q' = scale * R_K q per query head, [B, Hq, D] f32: the query heads of a KV head are
    // consecutive, so a group's rows are contiguous.
    std::vector<float> rotated(static_cast<size_t>(heads * d));
    pool.parallel_for(heads, [&](int64_t i) {
      std::vector<double> x(static_cast<size_t>(d));
      const T* q = a.q.ptr<const T>() + i * d;
      for (int64_t j = 0; j < d; ++j) x[size_t(j)] = to_f32(q[j]);
      c.k_codec->rotation().apply(x, x);
      for (int64_t j = 0; j < d; ++j) rotated[size_t(i * d + j)] = float(x[size_t(j)] * a.options.scale);
    });
    // (2) Every task's partial state.
    std::vector<DecodeTask> tasks;
    std::vector<HeadSplits> kv_heads;
    MakeDecodeTasks(p.lengths, p.batch, p.hkv, kTileKeys, tasks, kv_heads);
    const int64_t rows = p.group(), slot_floats = rows * (d + 2);
    std::vector<float> partials(tasks.size() * size_t(slot_floats));
    std::vector<PartialSlot> slots;
    for (size_t t = 0; t < tasks.size(); ++t) slots.push_back({partials.data() + t * size_t(slot_floats), rows, d});
    std::vector<uint8_t> norms_valid(tasks.size());
    pool.parallel_for(int64_t(tasks.size()), [&](int64_t t) {
      const DecodeTask& task = tasks[size_t(t)];
      norms_valid[size_t(t)] = RunTask(p, task, rotated.data() + (task.b * p.hq + task.h * rows) * d, slots[size_t(t)]);
    });
    for (size_t t = 0; t < tasks.size(); ++t) {
      if (!norms_valid[t]) FailCorruptRecord(p, tasks[t]);
    }
    // (3) Per query head: its splits merged, the mean o' rotated back, out = R_V^T o'.
    pool.parallel_for(heads, [&](int64_t i) {
      const int64_t b = i / p.hq, head = i % p.hq;
      const HeadSplits& kv = kv_heads[size_t(b * p.hkv + head / rows)];
      std::vector<float> acc(static_cast<size_t>(d));
      const float l = MergeRow(slots.data() + kv.first_task, kv.splits, head % rows, acc.data());
      std::vector<double> x(static_cast<size_t>(d));
      for (int64_t j = 0; j < d; ++j) x[size_t(j)] = double(acc[size_t(j)]) / double(l);
      c.v_codec->rotation().apply_inverse(x, x);
      T* out = a.out.ptr<T>() + i * d;
      for (int64_t j = 0; j < d; ++j) out[j] = from_f32<T>(float(x[size_t(j)]));
    });
  });
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace decodelab::cpu {

HWY_EXPORT(TurboQuantDecodeAttentionPaged);

void turboquant_decode_attention_paged(const TurboQuantDecodeAttentionPagedArgs& a) {
  HWY_DYNAMIC_DISPATCH(TurboQuantDecodeAttentionPaged)(a);
}

}  // namespace decodelab::cpu
#endif  // HWY_ONCE
