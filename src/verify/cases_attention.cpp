// Verification cases for attention: prefill (causal and not, chunk-aligned), and queries over
// contiguous and paged caches, for MHA, GQA and MQA, D = 64, 96, 128, lengths that are not tile
// multiples, and large logits for softmax stability.
#include <fmt/format.h>

#include "verify/harness.h"
#include "verify/random.h"

namespace decodelab::verify {
namespace {

struct PrefillShape {
  int64_t batch, sq, skv, hq, hkv, d;
  bool causal;
  double q_scale;  // >1: large logits
};

const PrefillShape kPrefill[] = {
    {1, 33, 33, 4, 4, 64, true, 1.0},     // MHA, a tile + 1
    {2, 17, 17, 8, 2, 128, true, 1.0},    // GQA 4
    {1, 5, 37, 6, 1, 96, false, 1.0},     // MQA, not causal
    {1, 3, 20, 4, 2, 64, true, 1.0},      // chunk: last query aligned with last key
    {1, 16, 16, 2, 1, 128, true, 12.0},   // large logits
};

struct CachedShape {
  std::vector<int32_t> lengths;
  int64_t sq, hq, hkv, d, page_size;
  double q_scale;
};

const CachedShape kCached[] = {
    {{1, 37, 130}, 1, 8, 2, 128, 16, 1.0},  // decode, GQA 4, length 1 and non-multiples
    {{64}, 1, 32, 8, 128, 16, 1.0},         // Llama-3-8B head layout
    {{9, 20}, 4, 4, 4, 64, 5, 1.0},         // chunked prefill over the cache, odd page size
    {{45}, 1, 6, 1, 96, 8, 1.0},            // MQA, D = 96
    {{50}, 1, 4, 2, 64, 16, 12.0},          // large logits
};

Tolerance attention_tolerance(DType t, double q_scale) {
  // Sharp softmax (large logits) amplifies f32 rounding of the scores.
  return rounding_tolerance(t, q_scale > 1.0 ? 10.0 : 1.0);
}

void add_prefill(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const PrefillShape& s : kPrefill) {
    const std::string name = fmt::format("B={} Sq={} Skv={} Hq={} Hkv={} D={}{}{}", s.batch, s.sq, s.skv, s.hq, s.hkv,
                                         s.d, s.causal ? " causal" : "", s.q_scale > 1.0 ? " large-logits" : "");
    add_cases<PrefillAttentionArgs>(
        grid, filter, name, [s](DType t) { return attention_tolerance(t, s.q_scale); },
        [s](DType t, uint64_t seed) {
          Rng rng(seed);
          CaseData d;
          d.inputs.push_back(random_array(t, {s.batch, s.sq, s.hq, s.d}, rng, s.q_scale));
          d.inputs.push_back(random_array(t, {s.batch, s.skv, s.hkv, s.d}, rng));
          d.inputs.push_back(random_array(t, {s.batch, s.skv, s.hkv, s.d}, rng));
          d.outputs.push_back({t, {s.batch, s.sq, s.hq, s.d}});
          return d;
        },
        [s](auto in, auto out) {
          AttentionOptions o{s.causal, float(1.0 / std::sqrt(double(s.d)))};
          return PrefillAttentionArgs{in[0], in[1], in[2], out[0], o, {}};
        });
  }
}

std::string cached_name(const CachedShape& s, bool paged) {
  return fmt::format("Sq={} Hq={} Hkv={} D={} lengths [{}]{}{}", s.sq, s.hq, s.hkv, s.d, fmt::join(s.lengths, ", "),
                     paged ? fmt::format(" page {}", s.page_size) : "", s.q_scale > 1.0 ? " large-logits" : "");
}

// Inputs: 0 q, 1 K, 2 V, then lengths (contiguous) or page table and lengths (paged).
CaseData cached_data(const CachedShape& s, bool paged, DType t, uint64_t seed) {
  Rng rng(seed);
  const int64_t batch = int64_t(s.lengths.size());
  int64_t capacity = 0;
  for (int32_t len : s.lengths) capacity = std::max<int64_t>(capacity, len + 7);
  CaseData d;
  d.inputs.push_back(random_array(t, {batch, s.sq, s.hq, s.d}, rng, s.q_scale));
  KVFixture f = paged ? paged_fixture(t, s.lengths, capacity, s.page_size, s.hkv, s.d, rng)
                      : contiguous_fixture(t, s.lengths, s.hkv, capacity, s.d, rng);
  d.inputs.push_back(std::move(f.k));
  d.inputs.push_back(std::move(f.v));
  if (paged) d.inputs.push_back(std::move(f.page_table));
  d.inputs.push_back(std::move(f.lengths));
  d.outputs.push_back({t, {batch, s.sq, s.hq, s.d}});
  return d;
}

void add_cached(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const CachedShape& s : kCached) {
    const AttentionOptions o{true, float(1.0 / std::sqrt(double(s.d)))};
    add_cases<DecodeAttentionArgs>(
        grid, filter, cached_name(s, false), [s](DType t) { return attention_tolerance(t, s.q_scale); },
        [s](DType t, uint64_t seed) { return cached_data(s, false, t, seed); },
        [o](auto in, auto out) { return DecodeAttentionArgs{in[0], ContiguousKV{in[1], in[2], in[3]}, out[0], o, {}}; });
    add_cases<DecodeAttentionPagedArgs>(
        grid, filter, cached_name(s, true), [s](DType t) { return attention_tolerance(t, s.q_scale); },
        [s](DType t, uint64_t seed) { return cached_data(s, true, t, seed); },
        [o](auto in, auto out) {
          return DecodeAttentionPagedArgs{in[0], PagedKV{in[1], in[2], in[3], in[4]}, out[0], o, {}};
        });
  }
}

}  // namespace

void add_attention_cases(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  add_prefill(grid, filter);
  add_cached(grid, filter);
}

}  // namespace decodelab::verify
