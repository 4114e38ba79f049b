// Verification cases for the paged KIVI cache (kivi_cache.h): the append (pools and ring bit-exact
// against the reference, which runs KiviCache's rule with KiviCodec's encoders), one new token per
// sequence and several apart, and fused decode attention against the reference, which decodes
// every record with KiviCodec and attends in double. Attention is single-token decode: one query
// per sequence, at lengths 1 and 17 (all in the recent window, or with
// R = 0 all values quantized), lengths that are not multiples of G or of the page, and a few
// thousand; 2 and 4 bits; head_dim 64, 96, 128, 256; GQA 1, 4, 6, 8; R 0 and 32; key blocks
// shorter and longer than the kernel's 64-token tile; value groups narrower than a vector.
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>

#include "decodelab/kivi_cache.h"
#include "kvquant/kivi_record.h"
#include "verify/harness.h"
#include "verify/random.h"
#include "verify/record_cache_fixture.h"

namespace decodelab::verify {
namespace {

using kvquant::KiviCodec;
using kvquant::KiviConfig;

struct Shape {
  std::vector<int32_t> lengths;
  int64_t hq, hkv, d, page_size;
  int bits;
  int64_t key_group, value_group, residual;
  double q_scale = 1.0;  // > 1: large logits

  KiviConfig config() const { return {d, bits, key_group, value_group, residual}; }
  std::string name() const {
    // hq = 0 for an append, which has no queries.
    return fmt::format("{}Hkv={} D={} lengths [{}] page {} {}-bit G={} value groups {} R={}{}",
                       hq > 0 ? fmt::format("Hq={} ", hq) : "", hkv, d, fmt::join(lengths, ", "), page_size, bits,
                       key_group, value_group, residual, q_scale > 1.0 ? " large-logits" : "");
  }
};

const Shape kAttention[] = {
    {{1, 17}, 8, 2, 128, 32, 2, 32, 32, 32},          // all in the window, GQA 4
    {{1, 17}, 8, 2, 128, 32, 4, 32, 32, 0},           // R = 0: values quantized, keys not yet
    {{45, 130}, 8, 8, 64, 32, 2, 32, 32, 0},          // MHA, D = 64, not multiples of G or the page
    {{100, 33}, 12, 2, 96, 64, 4, 32, 32, 32},        // GQA 6, D = 96
    {{3001}, 32, 4, 128, 128, 2, 32, 32, 32},         // GQA 8, thousands
    {{2050, 70}, 32, 4, 128, 64, 4, 32, 128, 0},      // thousands, R = 0, one value group per token
    {{200, 1}, 4, 1, 256, 64, 2, 64, 128, 32},        // D = 256, MQA
    {{300}, 8, 2, 128, 128, 4, 128, 16, 32},          // a key block spans tiles
    {{77}, 6, 6, 96, 32, 2, 16, 24, 32},              // value groups of 24 (a vector and a tail)
    {{64, 500}, 32, 8, 128, 32, 4, 32, 32, 32, 4.0},  // Llama-3-8B heads, large logits
    {{130, 7}, 8, 2, 128, 96, 3, 48, 32, 16},         // 3 bits (codes across words), G = 48 (tiles of 32, 16)
    {{90}, 4, 2, 64, 32, 1, 32, 32, 8},               // 1 bit
};

// Appends (hq unused): one new token that completes a key block (length R + G - 1 and, R = 0,
// G - 1), quantizes the first value (length R) or starts a page (length 0, a page multiple);
// several new tokens that quantize values but no key block, one block, or several blocks.
struct AppendShape {
  Shape s;
  int64_t tokens;
};

const AppendShape kAppend[] = {
    {{{63, 0, 32}, 0, 2, 128, 32, 2, 32, 32, 32}, 1},
    {{{31, 95, 64}, 0, 4, 64, 64, 4, 32, 16, 0}, 1},
    {{{159, 200}, 0, 1, 256, 128, 2, 64, 128, 32}, 1},
    {{{0, 25}, 0, 2, 128, 32, 2, 32, 32, 32}, 40},
    {{{5, 30}, 0, 3, 96, 32, 4, 16, 24, 0}, 70},
    {{{62}, 0, 8, 128, 64, 4, 32, 32, 32}, 3},
};

// The cache of `lengths` in kivi_cache.h's layout, with room for `extra` more tokens per
// sequence: the tokens' keys and values N(0, 1) (with a channel
// offset, so that lo is far from 0 on some channels), encoded with the codec where KiviCache's
// rule quantizes them and in the ring where it does not. Every other byte of the pools is 0xFF
// (lo reads as NaN: a kernel that reads a block or record it should not fails as corrupt) and of
// the ring 0xFF too (NaN: the output shows it).
std::vector<Array> make_cache(const std::vector<int32_t>& lengths, int64_t hkv, int64_t page_size,
                              const KiviCodec& codec, int64_t extra, Rng& rng) {
  const KiviConfig& c = codec.config();
  const int64_t batch = int64_t(lengths.size()), d = c.head_dim, g = c.key_group, window = c.residual + g;
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  const int64_t max_pages = (longest + extra + page_size - 1) / page_size;
  const int64_t num_pages = batch * max_pages + 3;  // a few pages nobody owns
  std::vector<int32_t> order(static_cast<size_t>(num_pages));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng.engine());
  order.resize(size_t(batch * max_pages));
  const int64_t kb = codec.key_block_bytes(), vb = codec.value_record_bytes();
  Array k_pages(DType::u8, {num_pages, page_size / g, hkv, kb}), v_pages(DType::u8, {num_pages, page_size, hkv, vb});
  Array recent_k(DType::f32, {batch, window, hkv, d}), recent_v(DType::f32, {batch, window, hkv, d});
  for (Array* a : {&k_pages, &v_pages, &recent_k, &recent_v}) std::memset(a->data(), 0xFF, a->nbytes());
  std::vector<float> offset(static_cast<size_t>(d));
  for (float& e : offset) e = float(3.0 * rng.normal());
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = lengths[size_t(b)];
    const int64_t qk = detail::kivi_quantized_keys(length, g, c.residual), qv = detail::kivi_quantized_values(length, c.residual);
    for (int64_t h = 0; h < hkv; ++h) {
      std::vector<float> keys(size_t(length * d)), values(size_t(length * d));
      for (size_t i = 0; i < keys.size(); ++i) {
        keys[i] = float(rng.normal()) + offset[i % size_t(d)];
        values[i] = float(rng.normal());
      }
      for (int64_t t = 0; t < length; ++t) {
        const int64_t slot = int64_t(order[size_t(b * max_pages + t / page_size)]) * page_size + t % page_size;
        const std::span<const float> k(keys.data() + t * d, size_t(d)), v(values.data() + t * d, size_t(d));
        if (t < qk && t % g == 0) {
          codec.encode_keys(std::span<const float>(keys).subspan(size_t(t * d), size_t(g * d)),
                            {k_pages.ptr<uint8_t>() + (slot / g * hkv + h) * kb, size_t(kb)});
        }
        if (t >= qk) std::copy(k.begin(), k.end(), recent_k.ptr<float>() + ((b * window + t % window) * hkv + h) * d);
        if (t < qv) {
          codec.encode_value(v, {v_pages.ptr<uint8_t>() + (slot * hkv + h) * vb, size_t(vb)});
        } else {
          std::copy(v.begin(), v.end(), recent_v.ptr<float>() + ((b * window + t % window) * hkv + h) * d);
        }
      }
    }
  }
  std::vector<Array> cache;
  cache.push_back(std::move(k_pages));
  cache.push_back(std::move(v_pages));
  cache.push_back(std::move(recent_k));
  cache.push_back(std::move(recent_v));
  cache.push_back(i32_array({batch, max_pages}, order));
  cache.push_back(i32_array({batch}, lengths));
  return cache;
}

}  // namespace

void add_kivi_cases(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const Shape& s : kAttention) {
    auto codec = std::make_shared<const KiviCodec>(s.config());
    add_cases<KiviDecodeAttentionPagedArgs>(
        grid, filter, s.name(), [s](DType t) { return compressed_attention_tolerance(t, s.q_scale); },
        [s, codec](DType t, uint64_t seed) {
          Rng rng(seed);
          const int64_t batch = int64_t(s.lengths.size());
          CaseData d;
          d.inputs.push_back(random_array(t, {batch, s.hq, s.d}, rng, s.q_scale));
          for (Array& a : make_cache(s.lengths, s.hkv, s.page_size, *codec, 0, rng)) d.inputs.push_back(std::move(a));
          d.outputs.push_back({t, {batch, s.hq, s.d}});
          return d;
        },
        [codec](auto in, auto out) {
          return KiviDecodeAttentionPagedArgs{
              in[0], PagedKiviKV{in[1], in[2], in[3], in[4], in[5], in[6], codec.get()}, out[0], {true, 0.0f}, {}};
        });
  }
  for (const auto& [s, tokens] : kAppend) {
    auto codec = std::make_shared<const KiviCodec>(s.config());
    // The pools and the ring are written in place, so every byte of them is compared; slots the
    // reference leaves alone stay 0xFF.
    add_cases<KiviAppendPagedArgs>(
        grid, filter, s.name() + new_tokens_name(tokens), [](DType) { return append_tolerance("KiviCodec's encoders"); },
        [s, tokens, codec](DType t, uint64_t seed) {
          Rng rng(seed);
          CaseData d;
          add_new_tokens(d, t, int64_t(s.lengths.size()), tokens, s.hkv, s.d, rng);
          for (Array& a : make_cache(s.lengths, s.hkv, s.page_size, *codec, tokens, rng)) d.inputs.push_back(std::move(a));
          add_in_place_outputs(d, 2, 4);
          return d;
        },
        [codec](auto in, auto out) {
          return KiviAppendPagedArgs{in[0], in[1], PagedKiviKV{out[0], out[1], out[2], out[3], in[6], in[7], codec.get()}, {}};
        });
  }
}

}  // namespace decodelab::verify
