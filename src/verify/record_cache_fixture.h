// What the verification cases of the paged record caches share (cases_turboquant.cpp,
// cases_rabitq.cpp, cases_qjl.cpp): a case's two codecs built on first use, pools filled with the
// records of random vectors, and the decode attention and append cases over them; with the KIVI
// cache's (cases_kivi.cpp), the new tokens and in-place outputs of an append.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "verify/harness.h"
#include "verify/random.h"

namespace decodelab::verify {

// A case's key and value codecs, built on first use (a Lloyd-Max codebook is computed, not looked
// up, and the grid is listed far more often than it is run).
template <class K, class V>
class LazyCodecs {
 public:
  using KConfig = std::remove_cvref_t<decltype(std::declval<const K&>().config())>;
  using VConfig = std::remove_cvref_t<decltype(std::declval<const V&>().config())>;
  LazyCodecs(KConfig k, VConfig v) : k_config_(std::move(k)), v_config_(std::move(v)) {}
  const K& k() { return get().first; }
  const V& v() { return get().second; }

 private:
  std::pair<K, V>& get() {
    std::call_once(once_, [&] { codecs_ = std::make_unique<std::pair<K, V>>(k_config_, v_config_); });
    return *codecs_;
  }
  KConfig k_config_;
  VConfig v_config_;
  std::once_flag once_;
  std::unique_ptr<std::pair<K, V>> codecs_;
};

// The pools, page table and lengths of a paged record cache of Hkv heads of dimension d, with
// `extra` free slots after each length: every record below a length encodes an N(0, 1) vector;
// every other byte is 0xFF, whose norm reads as NaN, so a kernel that reads past a length or a
// page it does not own fails (a corrupt record) or outputs NaN.
struct RecordFixture {
  Array k_pages, v_pages, page_table, lengths;
};

template <class Codecs>
RecordFixture make_record_fixture(const std::vector<int32_t>& lengths, int64_t hkv, int64_t d, int64_t page_size,
                                  Codecs& codecs, int64_t extra, Rng& rng) {
  const int64_t batch = int64_t(lengths.size());
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  const int64_t max_pages = (longest + extra + page_size - 1) / page_size;
  const int64_t num_pages = batch * max_pages + 3;  // a few pages nobody owns
  std::vector<int32_t> order(static_cast<size_t>(num_pages));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng.engine());
  order.resize(size_t(batch * max_pages));
  const auto& k = codecs.k();
  const auto& v = codecs.v();
  RecordFixture f{Array(DType::u8, {num_pages, page_size, hkv, k.record_bytes()}),
                  Array(DType::u8, {num_pages, page_size, hkv, v.record_bytes()}), i32_array({batch, max_pages}, order),
                  i32_array({batch}, lengths)};
  std::memset(f.k_pages.data(), 0xFF, f.k_pages.nbytes());
  std::memset(f.v_pages.data(), 0xFF, f.v_pages.nbytes());
  std::vector<float> x(static_cast<size_t>(d));
  // Encodes the next N(0, 1) vector into record `index` of `pool`.
  const auto encode = [&](const auto& codec, Array& pool, int64_t index) {
    for (float& e : x) e = float(rng.normal());
    const int64_t r = codec.record_bytes();
    codec.encode(x, std::span<uint8_t>(pool.template ptr<uint8_t>() + index * r, size_t(r)));
  };
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < lengths[size_t(b)]; ++t) {
      const int64_t page = order[size_t(b * max_pages + t / page_size)];
      for (int64_t h = 0; h < hkv; ++h) {
        const int64_t index = (page * page_size + t % page_size) * hkv + h;
        encode(k, f.k_pages, index);
        encode(v, f.v_pages, index);
      }
    }
  }
  return f;
}

// The fixture's pools, page table and lengths as the case's next four inputs, in that order.
inline void add_fixture_inputs(CaseData& data, RecordFixture&& f) {
  data.inputs.push_back(std::move(f.k_pages));
  data.inputs.push_back(std::move(f.v_pages));
  data.inputs.push_back(std::move(f.page_table));
  data.inputs.push_back(std::move(f.lengths));
}

// Decode attention cases over a paged record cache, one per backend and dtype, for each shape `s`
// (lengths, hq, hkv, d, page_size, q_scale, name(), k_config(), v_config()): q [B, Hq, D] of
// N(0, q_scale^2) draws, the fixture's pools with 5 free slots after each length, out [B, Hq, D];
// the default scale. Args{q, Cache{k_pages, v_pages, page_table, lengths, &k codec, &v codec},
// out, ..}, the codecs a LazyCodecs<K, V> per shape.
template <class Args, class Cache, class Codecs, class Shapes>
void add_record_attention_cases(std::vector<VerifyCase>& grid, const GridFilter& filter, const Shapes& shapes) {
  for (const auto& s : shapes) {
    const auto codecs = std::make_shared<Codecs>(s.k_config(), s.v_config());
    add_cases<Args>(
      grid, filter, s.name(), [s](DType t) { return compressed_attention_tolerance(t, s.q_scale); },
      [s, codecs](DType t, uint64_t seed) {
        Rng rng(seed);
        const int64_t batch = int64_t(s.lengths.size());
        CaseData d;
        d.inputs.push_back(random_array(t, {batch, s.hq, s.d}, rng, s.q_scale));
        add_fixture_inputs(d, make_record_fixture(s.lengths, s.hkv, s.d, s.page_size, *codecs, 5, rng));
        d.outputs.push_back({t, {batch, s.hq, s.d}});
        return d;
      },
      [codecs](auto in, auto out) {
        return Args{in[0], Cache{in[1], in[2], in[3], in[4], &codecs->k(), &codecs->v()}, out[0], {true, 0.0f}, {}};
      });
  }
}

// The new tokens of an append case, k_new and v_new N(0, 1) as inputs 0 and 1: [B, Hkv, D] for
// one token per sequence (the decode form), [B, S, Hkv, D] for S > 1.
inline void add_new_tokens(CaseData& data, DType dtype, int64_t batch, int64_t tokens, int64_t hkv, int64_t d,
                           Rng& rng) {
  const std::vector<int64_t> shape =
      tokens == 1 ? std::vector<int64_t>{batch, hkv, d} : std::vector<int64_t>{batch, tokens, hkv, d};
  data.inputs.push_back(random_array(dtype, shape, rng));
  data.inputs.push_back(random_array(dtype, shape, rng));
}

// The cache of an append, inputs [first, first + count), as outputs written in place: each starts
// as its input, and every byte is compared with the reference's.
inline void add_in_place_outputs(CaseData& data, size_t first, size_t count) {
  for (size_t i = first; i < first + count; ++i) {
    const Tensor t = data.inputs[i].view();
    data.outputs.push_back({t.dtype, std::vector<int64_t>(t.shape.begin(), t.shape.begin() + t.rank), int(i)});
  }
}

// An append's tolerance: none, as every backend runs the codecs' encoders (`which`).
inline Tolerance append_tolerance(const std::string& which) {
  return {0.0, "codes bit-exact: every backend runs " + which, true};
}

// " 5 new tokens" for a multi-token append's case name; "" for the decode form.
inline std::string new_tokens_name(int64_t tokens) {
  return tokens == 1 ? std::string() : fmt::format(" {} new tokens", tokens);
}

// The append cases of a paged record cache (Cache: PagedTurboQuantKV, PagedRabitqKV or
// PagedQjlKV, whose fields are the pools, the page table, the lengths and the two codecs in that
// order) for a shape `s` (lengths, hkv, d, page_size, name(), k_config(), v_config()): `tokens`
// new tokens per sequence written at the lengths of a record fixture, both pools compared bit for
// bit with the reference's (`encoders` the codecs' encoders every backend runs). The codecs a
// LazyCodecs<K, V>.
template <class Args, class Cache, class Codecs, class Shape>
void add_record_append_cases(std::vector<VerifyCase>& grid, const GridFilter& filter, const Shape& s, int64_t tokens,
                             const std::string& encoders) {
  const auto codecs = std::make_shared<Codecs>(s.k_config(), s.v_config());
  add_cases<Args>(
      grid, filter, s.name() + new_tokens_name(tokens), [encoders](DType) { return append_tolerance(encoders); },
      [s, tokens, codecs](DType t, uint64_t seed) {
        Rng rng(seed);
        CaseData data;
        add_new_tokens(data, t, int64_t(s.lengths.size()), tokens, s.hkv, s.d, rng);
        add_fixture_inputs(data, make_record_fixture(s.lengths, s.hkv, s.d, s.page_size, *codecs, tokens, rng));
        add_in_place_outputs(data, 2, 2);
        return data;
      },
      [codecs](auto in, auto out) {
        return Args{in[0], in[1], Cache{out[0], out[1], in[4], in[5], &codecs->k(), &codecs->v()}, {}};
      });
}

}  // namespace decodelab::verify
