// CPU fused decode attention over the paged KIVI cache (kivi_cache.h): the scores and the value
// sum are computed from the codes, never from a dequantized cache.
//
// Keys. Channel d of a key block has (lo_d, s_d) over the block's G tokens, so
//   q . k~_t = q . lo + sum_d (q_d s_d) code_td:
// each tile (which never spans two blocks) folds every query row of the group into q * s and its
// constant q . lo once, and a token then costs one dot product of q * s with its codes, expanded
// as integers 0 .. 2^b - 1 into f32 rows in L1 (expand_codes-inl.h). Values have (lo, s) per
// group of channels of one token, so a token's codes are expanded and mapped to lo + s * code in
// an L1 tile row, and the value sum runs over those rows. The full-precision tokens of the ring
// are read in place.
//
// Work as turboquant_attention.cpp's: one task per (sequence, KV head, key range) reads each
// record of its range once for all query heads of the GQA group, a tile of 64 tokens at a time,
// through the f16 decode kernel's tile arithmetic (attention_tiles-inl.h: DotKeys, SoftmaxRow,
// AccumulateRows); split-K partial states are merged by log-sum-exp in split order (MergeRow),
// with split points from the shape alone, so results are the same bits every run.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/kivi_attention.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/cache_control.h"
#include "cpu/simd.h"
#include "cpu/attention_tiles-inl.h"
#include "cpu/expand_codes-inl.h"

#include <algorithm>
#include <vector>

#include "cpu/cpu.h"
#include "cpu/element.h"
#include "cpu/thread_pool.h"
#include "kvquant/kivi_record.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
// Internal linkage: turboquant_attention.cpp has its own Problem, RunTask, ...
namespace {

// Tokens per tile; split-K as the f16 decode kernel (attention_tiles-inl.h).
constexpr int64_t kTileKeys = 64;

// The "codebook" that makes ExpandCentroids write KIVI's integer codes as floats.
constexpr float kCodeValues[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

using ExpandFn = void (*)(const uint8_t*, const float*, int64_t, float*);

struct Problem {
  const int32_t* lengths;
  const int32_t* page_table;
  int64_t max_pages, page_size;
  int64_t batch, hq, hkv, d;
  int64_t key_group, residual, window, value_group;
  const uint8_t* k_pages;
  const uint8_t* v_pages;
  int64_t key_block_bytes, value_record_bytes;
  const float* recent_k;
  const float* recent_v;
  int bits;
  ExpandFn expand;

  int64_t group() const { return hq / hkv; }
  int64_t value_groups() const { return d / value_group; }
  int64_t quantized_keys(int64_t b) const { return detail::kivi_quantized_keys(lengths[b], key_group, residual); }
  int64_t quantized_values(int64_t b) const { return detail::kivi_quantized_values(lengths[b], residual); }
  int64_t slot(int64_t b, int64_t t) const {
    return int64_t(page_table[b * max_pages + t / page_size]) * page_size + t % page_size;
  }
  // The key block that holds token t (a page holds whole blocks, so slot / G is its index).
  const uint8_t* key_block(int64_t b, int64_t h, int64_t t) const {
    return k_pages + (slot(b, t) / key_group * hkv + h) * key_block_bytes;
  }
  const uint8_t* value_record(int64_t b, int64_t h, int64_t t) const {
    return v_pages + (slot(b, t) * hkv + h) * value_record_bytes;
  }
  const float* recent(const float* ring, int64_t b, int64_t h, int64_t t) const {
    return ring + ((b * window + t % window) * hkv + h) * d;
  }
};

// The value record's D values lo_g + s_g code into row; returns whether its pairs are valid.
HWY_INLINE bool ExpandValue(const Problem& p, const uint8_t* HWY_RESTRICT record, float* HWY_RESTRICT row) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df)), groups = p.value_groups();
  p.expand(record + 8 * groups, kCodeValues, p.d, row);
  bool valid = true;
  for (int64_t g = 0; g < groups; ++g) {
    const float lo = detail::load_f32_le(record + 4 * g), scale = detail::load_f32_le(record + 4 * (groups + g));
    valid &= detail::is_valid_kivi_pair(lo, scale);
    const VF lo_v = hn::Set(df, lo), scale_v = hn::Set(df, scale);
    int64_t c = g * p.value_group;
    const int64_t end = c + p.value_group;
    for (; c + N <= end; c += N) hn::StoreU(hn::MulAdd(hn::LoadU(df, row + c), scale_v, lo_v), df, row + c);
    for (; c < end; ++c) row[c] = lo + scale * row[c];  // groups narrower than a vector (D / value_group odd)
  }
  return valid;
}

// fn(t, record) for the value records of tokens [t_begin, t_end) of (b, h), walking the pages:
// one division per call rather than one per token, which costs as much as expanding a record.
template <class Fn>
HWY_INLINE void ForValueRecords(const Problem& p, int64_t b, int64_t h, int64_t t_begin, int64_t t_end, Fn&& fn) {
  const int32_t* pages = p.page_table + b * p.max_pages;
  int64_t page = t_begin / p.page_size, in_page = t_begin % p.page_size;
  for (int64_t t = t_begin; t < t_end; ++t) {
    fn(t, p.v_pages + ((int64_t(pages[page]) * p.page_size + in_page) * p.hkv + h) * p.value_record_bytes);
    if (++in_page == p.page_size) {
      in_page = 0;
      ++page;
    }
  }
}

// Scratch of one task, allocated once per task.
struct TileBuffers {
  std::vector<float> k_rows, v_rows, scores, corr, folded, base, lo, scale;
  std::vector<const float*> k_ptrs, v_ptrs;
  TileBuffers(int64_t rows, int64_t d, int64_t stride)
      : k_rows(size_t(kTileKeys * d)), v_rows(k_rows.size()), scores(size_t(rows * stride)), corr(size_t(rows)),
        folded(size_t(rows * d)), base(size_t(rows)), lo(size_t(d)), scale(size_t(d)), k_ptrs(size_t(kTileKeys)),
        v_ptrs(size_t(kTileKeys)) {}
};

// Folds the G query rows q [rows][d] with the key block's (lo, scale): folded = q * scale,
// base = q . lo. Returns whether the block's pairs are valid.
bool FoldQuery(const Problem& p, const uint8_t* HWY_RESTRICT block, const float* HWY_RESTRICT q, int64_t rows,
               TileBuffers& buf) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df)), d = p.d;
  bool valid = true;
  for (int64_t c = 0; c < d; ++c) {
    buf.lo[size_t(c)] = detail::load_f32_le(block + 4 * c);
    buf.scale[size_t(c)] = detail::load_f32_le(block + 4 * (d + c));
    valid &= detail::is_valid_kivi_pair(buf.lo[size_t(c)], buf.scale[size_t(c)]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    VF sum = hn::Zero(df);
    for (int64_t c = 0; c < d; c += N) {
      const VF qv = hn::LoadU(df, q + r * d + c);
      sum = hn::MulAdd(qv, hn::LoadU(df, buf.lo.data() + c), sum);
      hn::StoreU(hn::Mul(qv, hn::LoadU(df, buf.scale.data() + c)), df, buf.folded.data() + r * d + c);
    }
    buf.base[size_t(r)] = hn::GetLane(hn::SumOfLanes(df, sum));
  }
  return valid;
}

// One task: the G query rows q [G][d] (pre-scaled) over its keys, into `slot`. Returns whether
// every record it read had valid (lo, scale) pairs (a corrupt one makes the slot NaN).
bool RunTask(const Problem& p, const DecodeTask& task, const float* HWY_RESTRICT q, const PartialSlot& slot) {
  const DF df;
  const int64_t N = int64_t(hn::Lanes(df));
  const int64_t d = p.d, rows = p.group(), stride = RoundUp(kTileKeys, N), b = task.b, h = task.h;
  const int64_t quantized_keys = p.quantized_keys(b), quantized_values = p.quantized_values(b);
  const int64_t code_bytes = d * p.bits / 8;  // one token's codes in a key block (D is a multiple of 16)
  TileBuffers buf(rows, d, stride);
  float* m = slot.m();
  float* l = slot.l();
  float* acc = slot.acc(0);
  std::fill(m, m + rows, kNoScore);
  std::fill(l, l + rows, 0.0f);
  std::fill(acc, acc + rows * d, 0.0f);
  bool valid = true;
  for (int64_t t0 = task.t_begin, t1; t0 < task.t_end; t0 = t1) {
    const bool quantized = t0 < quantized_keys;
    const int64_t block_start = t0 / p.key_group * p.key_group;
    // A quantized tile ends with its block (quantized_keys is a multiple of G, so no later).
    t1 = std::min(task.t_end, quantized ? std::min(t0 + kTileKeys, block_start + p.key_group) : t0 + kTileKeys);
    const int64_t n = t1 - t0;
    // The next tile's value records, asked for now: Hkv records apart, page after page, which the
    // hardware prefetchers do not follow; a key block's codes are contiguous and need no help.
    ForValueRecords(p, b, h, t1, std::min({task.t_end, t1 + kTileKeys, quantized_values}), [&](int64_t, const uint8_t* record) {
      hwy::Prefetch(record);
      hwy::Prefetch(record + p.value_record_bytes - 1);
    });
    const float* rows_q = q;
    if (quantized) {
      const uint8_t* block = p.key_block(b, h, t0);
      valid &= FoldQuery(p, block, q, rows, buf);
      rows_q = buf.folded.data();
      const uint8_t* codes = block + 8 * d + (t0 - block_start) * code_bytes;
      for (int64_t j = 0; j < n; ++j, codes += code_bytes) {
        p.expand(codes, kCodeValues, d, buf.k_rows.data() + j * d);
        buf.k_ptrs[size_t(j)] = buf.k_rows.data() + j * d;
      }
    } else {
      for (int64_t j = 0; j < n; ++j) buf.k_ptrs[size_t(j)] = p.recent(p.recent_k, b, h, t0 + j);
    }
    const int64_t quantized_end = std::clamp(quantized_values, t0, t1);
    ForValueRecords(p, b, h, t0, quantized_end, [&](int64_t t, const uint8_t* record) {
      const int64_t j = t - t0;
      valid &= ExpandValue(p, record, buf.v_rows.data() + j * d);
      buf.v_ptrs[size_t(j)] = buf.v_rows.data() + j * d;
    });
    for (int64_t t = quantized_end; t < t1; ++t) buf.v_ptrs[size_t(t - t0)] = p.recent(p.recent_v, b, h, t);
    float* scores = buf.scores.data();
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      WithBlock(rows - r0, [&](auto kr) {
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) DotKeys<kr(), 4>(rows_q + r0 * d, d, buf.k_ptrs.data() + j, scores + r0 * stride + j, stride);
        for (; j < n; ++j) DotKeys<kr(), 1>(rows_q + r0 * d, d, buf.k_ptrs.data() + j, scores + r0 * stride + j, stride);
      });
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* s = scores + r * stride;
      if (quantized) {
        for (int64_t j = 0; j < n; ++j) s[j] += buf.base[size_t(r)];
      }
      SoftmaxRow(s, n, n, m[r], l[r], buf.corr[size_t(r)]);
    }
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      WithBlock(rows - r0, [&](auto kr) {
        const float* pr = scores + r0 * stride;
        for (int64_t c = 0; c < d;) {
          if (d - c >= 4 * N) {
            AccumulateRows<kr(), 4>(pr, stride, buf.corr.data() + r0, buf.v_ptrs.data(), n, c, acc + r0 * d, d);
            c += 4 * N;
          } else {
            AccumulateRows<kr(), 1>(pr, stride, buf.corr.data() + r0, buf.v_ptrs.data(), n, c, acc + r0 * d, d);
            c += N;
          }
        }
      });
    }
  }
  return valid;
}

// A task of (b, h) saw a corrupt record: the first of (b, h) in the reference's order (a key
// block at its first token, before that token's value), so both backends name the same record.
[[noreturn]] void FailCorruptRecord(const Problem& p, int64_t b, int64_t h) {
  const detail::ArgCheck check(KiviDecodeAttentionPagedArgs::kOp);
  const int64_t quantized_keys = p.quantized_keys(b), quantized_values = p.quantized_values(b);
  for (int64_t t = 0; t < quantized_values; ++t) {
    if (t < quantized_keys && t % p.key_group == 0) {
      detail::check_kivi_pairs(check, p.key_block(b, h, t), p.d, detail::kivi_key_block_name(b, t, p.key_group, h));
    }
    detail::check_kivi_pairs(check, p.value_record(b, h, t), p.value_groups(), detail::kivi_value_record_name(b, t, h));
  }
  // Unreachable: the task's flag is set by exactly these pairs.
  check.fail(fmt::format("cache[sequence {}, KV head {}]", b, h), "valid records", "a corrupt record");
}

}  // namespace

void KiviDecodeAttentionPaged(const KiviDecodeAttentionPagedArgs& a) {
  const PagedKiviKV& c = a.cache;
  const kvquant::KiviConfig& config = c.codec->config();
  const Problem p{c.lengths.ptr<const int32_t>(),
                  c.page_table.ptr<const int32_t>(),
                  c.page_table.dim(1),
                  c.v_pages.dim(1),
                  a.q.dim(0),
                  a.q.dim(1),
                  c.v_pages.dim(2),
                  a.q.dim(2),
                  config.key_group,
                  config.residual,
                  c.recent_k.dim(1),
                  config.value_group,
                  c.k_pages.ptr<const uint8_t>(),
                  c.v_pages.ptr<const uint8_t>(),
                  c.codec->key_block_bytes(),
                  c.codec->value_record_bytes(),
                  c.recent_k.ptr<const float>(),
                  c.recent_v.ptr<const float>(),
                  config.bits,
                  config.bits == 1   ? ExpandCentroids<1>
                  : config.bits == 2 ? ExpandCentroids<2>
                  : config.bits == 3 ? ExpandCentroids<3>
                                     : ExpandCentroids<4>};
  const int64_t d = p.d, heads = p.batch * p.hq, rows = p.group();
  ThreadPool& pool = ThreadPool::instance();
  dispatch_activation(a.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    // (1) The query heads in f32, pre-scaled, [B, Hq, D]: a GQA group's rows are contiguous.
    std::vector<float> scaled(static_cast<size_t>(heads * d));
    const T* q = a.q.ptr<const T>();
    for (size_t i = 0; i < scaled.size(); ++i) scaled[i] = to_f32(q[i]) * a.options.scale;
    // (2) Every task's partial state.
    std::vector<DecodeTask> tasks;
    std::vector<HeadSplits> kv_heads;
    MakeDecodeTasks(p.lengths, p.batch, p.hkv, kTileKeys, tasks, kv_heads);
    const int64_t slot_floats = rows * (d + 2);
    std::vector<float> partials(tasks.size() * size_t(slot_floats));
    std::vector<PartialSlot> slots;
    for (size_t t = 0; t < tasks.size(); ++t) slots.push_back({partials.data() + t * size_t(slot_floats), rows, d});
    std::vector<uint8_t> valid(tasks.size());
    pool.parallel_for(int64_t(tasks.size()), [&](int64_t t) {
      const DecodeTask& task = tasks[size_t(t)];
      valid[size_t(t)] = RunTask(p, task, scaled.data() + (task.b * p.hq + task.h * rows) * d, slots[size_t(t)]);
    });
    for (size_t t = 0; t < tasks.size(); ++t) {
      if (!valid[t]) FailCorruptRecord(p, tasks[t].b, tasks[t].h);
    }
    // (3) Per query head: its splits merged, out = acc / l.
    pool.parallel_for(heads, [&](int64_t i) {
      const int64_t b = i / p.hq, head = i % p.hq;
      const HeadSplits& kv = kv_heads[size_t(b * p.hkv + head / rows)];
      std::vector<float> acc(static_cast<size_t>(d));
      const float l = MergeRow(slots.data() + kv.first_task, kv.splits, head % rows, acc.data());
      T* out = a.out.ptr<T>() + i * d;
      for (int64_t j = 0; j < d; ++j) out[j] = from_f32<T>(acc[size_t(j)] / l);
    });
  });
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace decodelab::cpu {

HWY_EXPORT(KiviDecodeAttentionPaged);

void kivi_decode_attention_paged(const KiviDecodeAttentionPagedArgs& a) {
  HWY_DYNAMIC_DISPATCH(KiviDecodeAttentionPaged)(a);
}

}  // namespace decodelab::cpu
#endif  // HWY_ONCE
