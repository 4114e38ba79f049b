// Verification cases for KV appends and the QKV split family. Caches start with NaN in every
// unused slot; the harness checks that only the new tokens' slots change.
#include <fmt/format.h>

#include "verify/harness.h"
#include "verify/random.h"

namespace decodelab::verify {
namespace {

// Geometry shared by the cache cases: lengths that cross page and tile boundaries.
struct CacheGeometry {
  std::vector<int32_t> lengths;
  int64_t new_tokens, hq, hkv, d, capacity, page_size;
  std::string name() const {
    return fmt::format("B={} S={} Hq={} Hkv={} D={} lengths [{}] page {}", lengths.size(), new_tokens, hq, hkv, d,
                       fmt::join(lengths, ", "), page_size);
  }
};

// A decode batch of 64 sequences whose lengths repeat (16 distinct positions): enough work for
// the CPU kernels to split over their threads, and rows of the RoPE table shared by sequences.
std::vector<int32_t> repeating_lengths() {
  std::vector<int32_t> lengths;
  for (int32_t b = 0; b < 64; ++b) lengths.push_back(20 + (b * 5) % 16);
  return lengths;
}

const CacheGeometry kGeometries[] = {
    {{5, 17}, 3, 4, 2, 64, 40, 4},   // GQA 2, tokens cross a page boundary
    {{0}, 1, 8, 1, 128, 16, 16},     // MQA, the first token of a sequence
    {{31, 2, 9}, 2, 6, 6, 96, 48, 8},  // MHA, D = 96
    {repeating_lengths(), 1, 16, 4, 64, 48, 16},  // GQA 4, a threaded decode batch
};

// Inputs for the appends: 0 k_new, 1 v_new, then the cache (2 k, 3 v, 4 lengths or 4 page table,
// 5 lengths); outputs are the cache's K and V.
CaseData append_data(const CacheGeometry& g, bool paged, DType t, uint64_t seed) {
  Rng rng(seed);
  const int64_t batch = int64_t(g.lengths.size());
  CaseData d;
  d.inputs.push_back(random_array(t, {batch, g.new_tokens, g.hkv, g.d}, rng));
  d.inputs.push_back(random_array(t, {batch, g.new_tokens, g.hkv, g.d}, rng));
  KVFixture f = paged ? paged_fixture(t, g.lengths, g.capacity, g.page_size, g.hkv, g.d, rng)
                      : contiguous_fixture(t, g.lengths, g.hkv, g.capacity, g.d, rng);
  const std::vector<int64_t> cache_shape(f.k.view().shape.begin(), f.k.view().shape.end());
  d.inputs.push_back(std::move(f.k));
  d.inputs.push_back(std::move(f.v));
  if (paged) d.inputs.push_back(std::move(f.page_table));
  d.inputs.push_back(std::move(f.lengths));
  d.outputs.push_back({t, cache_shape, 2});
  d.outputs.push_back({t, cache_shape, 3});
  return d;
}

void add_appends(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const CacheGeometry& g : kGeometries) {
    add_cases<KvAppendArgs>(
        grid, filter, g.name(), [](DType t) { return rounding_tolerance(t); },
        [g](DType t, uint64_t seed) { return append_data(g, false, t, seed); },
        [](auto in, auto out) { return KvAppendArgs{in[0], in[1], ContiguousKV{out[0], out[1], in[4]}, {}}; });
    add_cases<KvAppendPagedArgs>(
        grid, filter, g.name(), [](DType t) { return rounding_tolerance(t); },
        [g](DType t, uint64_t seed) { return append_data(g, true, t, seed); },
        [](auto in, auto out) { return KvAppendPagedArgs{in[0], in[1], PagedKV{out[0], out[1], in[4], in[5]}, {}}; });
  }
}

RopeParams llama3_rope() { return RopeParams{500000.0f, RopeStyle::half_split, 0, true, {}}; }

void add_splits(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const CacheGeometry& g : kGeometries) {
    const int64_t tokens = int64_t(g.lengths.size()) * g.new_tokens;
    const int64_t width = (g.hq + 2 * g.hkv) * g.d;
    auto split_data = [g, tokens, width](DType t, uint64_t seed) {
      Rng rng(seed);
      CaseData d;
      d.inputs.push_back(random_array(t, {tokens, width}, rng));
      std::vector<int32_t> positions;
      for (int64_t i = 0; i < tokens; ++i) positions.push_back(int32_t(rng.uniform_int(0, 9000)));
      d.inputs.push_back(i32_array({tokens}, positions));
      d.outputs.push_back({t, {tokens, g.hq, g.d}});
      d.outputs.push_back({t, {tokens, g.hkv, g.d}});
      d.outputs.push_back({t, {tokens, g.hkv, g.d}});
      return d;
    };
    const std::string name = fmt::format("T={} Hq={} Hkv={} D={}", tokens, g.hq, g.hkv, g.d);
    add_cases<QkvSplitArgs>(
        grid, filter, name, [](DType t) { return rounding_tolerance(t); }, split_data,
        [](auto in, auto out) { return QkvSplitArgs{in[0], out[0], out[1], out[2], {}}; });
    RopeParams rope = llama3_rope();
    rope.rotary_dim = int(g.d);
    add_cases<QkvSplitRopeArgs>(
        grid, filter, name + " llama3", [](DType t) { return rounding_tolerance(t); }, split_data,
        [rope](auto in, auto out) { return QkvSplitRopeArgs{in[0], in[1], out[0], out[1], out[2], rope, {}}; });
  }
}

// Inputs: 0 qkv [B, S, width], then the cache as in append_data (from index 1); outputs: q_out,
// then the cache's K and V.
CaseData rope_append_data(const CacheGeometry& g, bool paged, DType t, uint64_t seed) {
  CaseData kv = append_data(g, paged, t, seed);
  Rng rng(seed ^ 0x9E3779B97F4A7C15ull);
  const int64_t batch = int64_t(g.lengths.size());
  CaseData d;
  d.inputs.push_back(random_array(t, {batch, g.new_tokens, (g.hq + 2 * g.hkv) * g.d}, rng));
  for (size_t i = 2; i < kv.inputs.size(); ++i) d.inputs.push_back(std::move(kv.inputs[i]));
  d.outputs.push_back({t, {batch, g.new_tokens, g.hq, g.d}});
  d.outputs.push_back({t, kv.outputs[0].shape, 1});
  d.outputs.push_back({t, kv.outputs[1].shape, 2});
  return d;
}

void add_rope_appends(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const CacheGeometry& g : kGeometries) {
    RopeParams rope = llama3_rope();
    rope.rotary_dim = int(g.d);
    add_cases<QkvRopeAppendArgs>(
        grid, filter, g.name(), [](DType t) { return rounding_tolerance(t); },
        [g](DType t, uint64_t seed) { return rope_append_data(g, false, t, seed); },
        [rope](auto in, auto out) {
          return QkvRopeAppendArgs{in[0], out[0], ContiguousKV{out[1], out[2], in[3]}, rope, {}};
        });
    add_cases<QkvRopeAppendPagedArgs>(
        grid, filter, g.name(), [](DType t) { return rounding_tolerance(t); },
        [g](DType t, uint64_t seed) { return rope_append_data(g, true, t, seed); },
        [rope](auto in, auto out) {
          return QkvRopeAppendPagedArgs{in[0], out[0], PagedKV{out[1], out[2], in[3], in[4]}, rope, {}};
        });
  }
}

}  // namespace

void add_cache_cases(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  add_appends(grid, filter);
  add_splits(grid, filter);
  add_rope_appends(grid, filter);
}

}  // namespace decodelab::verify
