// The paged KIVI cache ops (kivi_cache.h), on every backend that runs them: a cache filled token
// by token as an engine would fill it, through KiviCodec, gives attention over KiviCache's decoded
// keys() and values() for the same tokens; a cache filled by kivi_append_paged, in appends of one
// token and of many, gives the same bytes and the same attention as a cache built at once from
// the same tokens; each bad argument and each corrupt record read gets an error naming it.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "decodelab/dtype.h"
#include "decodelab/kivi_cache.h"
#include "error_of.h"
#include "kvquant/kivi_record.h"
#include "verify/random.h"

namespace decodelab {
namespace {

using kvquant::KiviCache;
using kvquant::KiviCodec;
using kvquant::KiviConfig;
using verify::i32_array;

constexpr const char* kBackends[] = {"reference", "cpu"};

// B sequences of a paged KIVI cache filled one token at a time by the rule of kivi_cache.h: the
// new token into the ring, then the value that left the last R and the key block that did into
// their pages, read back from the ring. Beside it, one KiviCache per (sequence, KV head) fed the
// same vectors, and the vectors themselves.
class Engine {
 public:
  Engine(const KiviConfig& config, int64_t batch, int64_t hkv, int64_t page_size, int64_t capacity)
      : codec_(config), batch_(batch), hkv_(hkv), d_(config.head_dim), page_(page_size),
        window_(config.residual + config.key_group), max_pages_((capacity + page_size - 1) / page_size),
        k_pages_(DType::u8, {batch * max_pages_, page_size / config.key_group, hkv, codec_.key_block_bytes()}),
        v_pages_(DType::u8, {batch * max_pages_, page_size, hkv, codec_.value_record_bytes()}),
        recent_k_(DType::f32, {batch, window_, hkv, d_}), recent_v_(DType::f32, {batch, window_, hkv, d_}),
        lengths_(i32_array({batch}, std::vector<int32_t>(size_t(batch), 0))),
        exact_k_(size_t(batch * hkv)), exact_v_(size_t(batch * hkv)) {
    // Sequence b owns every B-th page from b, so the pages of the sequences interleave.
    std::vector<int32_t> pages(static_cast<size_t>(batch * max_pages_));
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < max_pages_; ++i) pages[size_t(b * max_pages_ + i)] = int32_t(i * batch + b);
    }
    table_ = i32_array({batch, max_pages_}, pages);
    // Slots not yet written hold zeros: valid records (lo 0, scale 0) and finite ring entries.
    for (Array* a : {&k_pages_, &v_pages_, &recent_k_, &recent_v_}) std::memset(a->data(), 0, a->nbytes());
    for (int64_t i = 0; i < batch * hkv; ++i) oracle_.emplace_back(config);
  }

  // One random token for sequence b: keys with a per-channel offset (lo far from 0), values N(0, 1).
  void append(int64_t b, verify::Rng& rng) {
    const KiviConfig& c = codec_.config();
    const int64_t t = lengths_.ptr<int32_t>()[b], g = c.key_group;
    for (int64_t h = 0; h < hkv_; ++h) {
      std::vector<float> k(static_cast<size_t>(d_)), v(static_cast<size_t>(d_));
      for (int64_t j = 0; j < d_; ++j) {
        k[size_t(j)] = float(rng.normal()) + float(j % 7) - 3.0f;
        v[size_t(j)] = float(rng.normal());
      }
      std::copy(k.begin(), k.end(), ring(recent_k_, b, h, t));
      std::copy(v.begin(), v.end(), ring(recent_v_, b, h, t));
      oracle_[size_t(b * hkv_ + h)].append(k, v);
      exact_k_[size_t(b * hkv_ + h)].insert(exact_k_[size_t(b * hkv_ + h)].end(), k.begin(), k.end());
      exact_v_[size_t(b * hkv_ + h)].insert(exact_v_[size_t(b * hkv_ + h)].end(), v.begin(), v.end());
      // With t + 1 tokens, the value of token t - R has left the window of the last R.
      const int64_t u = t - c.residual;
      if (u >= 0) codec_.encode_value({ring(recent_v_, b, h, u), size_t(d_)}, value_record(b, h, u));
      // And the block of G keys ending at token t - R, once whole.
      if (u >= 0 && (u + 1) % g == 0) {
        std::vector<float> block(size_t(g * d_));
        for (int64_t i = 0; i < g; ++i) std::copy_n(ring(recent_k_, b, h, u + 1 - g + i), d_, block.begin() + i * d_);
        codec_.encode_keys(block, key_block(b, h, u + 1 - g));
      }
    }
    ++lengths_.ptr<int32_t>()[b];
  }

  PagedKiviKV cache() const { return {k_pages_, v_pages_, recent_k_, recent_v_, table_, lengths_, &codec_}; }

  // The op's output for q = [B, Hq, D] f32 on `backend`.
  std::vector<float> attend(const std::vector<float>& q, int64_t hq, const char* backend) const {
    Array q_array(DType::f32, {batch_, hq, d_}), out(DType::f32, {batch_, hq, d_});
    std::memcpy(q_array.data(), q.data(), q_array.nbytes());
    kivi_decode_attention_paged(q_array, cache(), out, {}, {backend});
    return {out.ptr<float>(), out.ptr<float>() + out.numel()};
  }

  // Softmax attention over KiviCache's keys() and values() (decoded), or over the vectors as
  // given (exact), in double.
  std::vector<double> reference(const std::vector<float>& q, int64_t hq, bool decoded) const {
    std::vector<double> out(q.size());
    const double scale = 1.0 / std::sqrt(double(d_));
    for (int64_t b = 0; b < batch_; ++b) {
      for (int64_t h = 0; h < hq; ++h) {
        const size_t kv = size_t(b * hkv_ + h / (hq / hkv_));
        const std::vector<float> keys = decoded ? oracle_[kv].keys() : exact_k_[kv];
        const std::vector<float> values = decoded ? oracle_[kv].values() : exact_v_[kv];
        const int64_t length = int64_t(keys.size()) / d_, at = (b * hq + h) * d_;
        std::vector<double> scores(size_t(length), 0.0);
        for (int64_t t = 0; t < length; ++t) {
          for (int64_t j = 0; j < d_; ++j) scores[size_t(t)] += double(q[size_t(at + j)]) * keys[size_t(t * d_ + j)] * scale;
        }
        const double top = *std::max_element(scores.begin(), scores.end());
        double sum = 0.0;
        for (int64_t t = 0; t < length; ++t) {
          const double p = std::exp(scores[size_t(t)] - top);
          sum += p;
          for (int64_t j = 0; j < d_; ++j) out[size_t(at + j)] += p * values[size_t(t * d_ + j)];
        }
        for (int64_t j = 0; j < d_; ++j) out[size_t(at + j)] /= sum;
      }
    }
    return out;
  }

  const KiviCache& oracle(int64_t b, int64_t h) const { return oracle_[size_t(b * hkv_ + h)]; }
  int64_t length(int64_t b) const { return lengths_.ptr<int32_t>()[b]; }

  // The record bytes of the key block holding token t, and of token t's value.
  std::span<uint8_t> key_block(int64_t b, int64_t h, int64_t t) const {
    const int64_t bytes = codec_.key_block_bytes();
    return {k_pages_.ptr<uint8_t>() + (slot(b, t) / codec_.config().key_group * hkv_ + h) * bytes, size_t(bytes)};
  }
  std::span<uint8_t> value_record(int64_t b, int64_t h, int64_t t) const {
    const int64_t bytes = codec_.value_record_bytes();
    return {v_pages_.ptr<uint8_t>() + (slot(b, t) * hkv_ + h) * bytes, size_t(bytes)};
  }

 private:
  int64_t slot(int64_t b, int64_t t) const { return table_.ptr<int32_t>()[b * max_pages_ + t / page_] * page_ + t % page_; }
  float* ring(const Array& a, int64_t b, int64_t h, int64_t t) const {
    return a.ptr<float>() + ((b * window_ + t % window_) * hkv_ + h) * d_;
  }

  KiviCodec codec_;
  int64_t batch_, hkv_, d_, page_, window_, max_pages_;
  Array k_pages_, v_pages_, recent_k_, recent_v_, lengths_, table_;
  std::vector<KiviCache> oracle_;
  std::vector<std::vector<float>> exact_k_, exact_v_;
};

std::vector<float> normal(verify::Rng& rng, int64_t n) {
  std::vector<float> x(static_cast<size_t>(n));
  for (float& e : x) e = float(rng.normal());
  return x;
}

template <class A, class B>
double relative_error(const std::vector<A>& out, const std::vector<B>& ref) {
  double err = 0.0, norm = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    err += (double(out[i]) - double(ref[i])) * (double(out[i]) - double(ref[i]));
    norm += double(ref[i]) * double(ref[i]);
  }
  return std::sqrt(err / norm);
}

// ---------------------------------------------------------------------------------------------
// Attention over KiviCache's decoded tokens

TEST(KiviCacheAttention, MatchesAttentionOverKiviCacheDecodedTokens) {
  // Sequence 1 runs 5 tokens behind sequence 0, so the two are at different places of the rule
  // (window, partial key block, whole blocks) and of their pages. The checks fall on length 1,
  // on either side of the first quantized value (R + 1) and key block (R + G), and past several
  // pages and split-K tasks.
  constexpr int64_t kD = 128, kHkv = 2, kHq = 8, kPage = 64, kLast = 300;
  const int64_t checks[] = {1, 17, 32, 33, 63, 64, 65, 100, 161, kLast};
  for (const int bits : {2, 4}) {
    for (const int64_t residual : {int64_t{0}, int64_t{32}}) {
      SCOPED_TRACE(fmt::format("{}-bit, R = {}", bits, residual));
      verify::Rng rng(uint64_t(70 + bits + residual));
      Engine engine({kD, bits, 32, 32, residual}, 2, kHkv, kPage, kLast + 5);
      for (const int64_t length : checks) {
        while (engine.length(0) < length + 5) engine.append(0, rng);
        while (engine.length(1) < length) engine.append(1, rng);
        const std::vector<float> q = normal(rng, 2 * kHq * kD);
        const std::vector<double> decoded = engine.reference(q, kHq, true);
        for (const char* backend : kBackends) {
          SCOPED_TRACE(fmt::format("{}, lengths {} and {}", backend, length + 5, length));
          EXPECT_LT(relative_error(engine.attend(q, kHq, backend), decoded), 2e-6);
        }
      }
      // The check above would not miss a kernel that read no codes: by now most tokens are
      // quantized, and attention over the exact tokens is far from that over the decoded ones.
      EXPECT_GT(engine.oracle(1, 0).quantized_keys(), kLast - residual - 32);
      const std::vector<float> q = normal(rng, 2 * kHq * kD);
      EXPECT_GT(relative_error(engine.reference(q, kHq, false), engine.reference(q, kHq, true)), 1e-3);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Bad arguments and corrupt records

// A valid cache for B = 1, Hkv = 2, D = 64, 2-bit, G = 16, R = 16, value groups of 32: 3 pages
// of 32 slots through a 3-entry page table (capacity 96), 70 tokens, so tokens [0, 48) have
// quantized keys (3 blocks) and [0, 54) quantized values.
struct KiviBadArgs : ::testing::TestWithParam<const char*> {
  Engine engine{{64, 2, 16, 32, 16}, 1, 2, 32, 96};
  Array q{DType::f32, {1, 4, 64}}, out{DType::f32, {1, 4, 64}};

  KiviBadArgs() {
    verify::Rng rng(9);
    for (int64_t i = 0; i < q.numel(); ++i) q.ptr<float>()[i] = float(rng.normal());
    while (engine.length(0) < 70) engine.append(0, rng);
  }
  std::string decode(const PagedKiviKV& c, const Tensor& query, const Tensor& output) const {
    return error_of([&] { kivi_decode_attention_paged(query, c, output, {}, {GetParam()}); });
  }
  std::string decode(const PagedKiviKV& c) const { return decode(c, q, out); }
};

TEST_P(KiviBadArgs, Arguments) {
  const std::string op = "kivi_decode_attention_paged: ";
  ASSERT_EQ(decode(engine.cache()), "");  // the baseline is good: each case below breaks one thing
  PagedKiviKV c = engine.cache();
  c.codec = nullptr;
  EXPECT_EQ(decode(c), op + "cache.codec: expected a KiviCodec, got null");
  const KiviCodec d128({128, 2, 16, 32, 16});
  c.codec = &d128;
  EXPECT_EQ(decode(c), op + "cache.codec: expected a codec for head_dim D = 64 (of q), got a codec for D = 128");
  // The same pools read with another key group: 32-slot pages hold one block of 32, not two of 16.
  const KiviCodec g32({64, 2, 32, 32, 16}), g24({64, 2, 24, 32, 16}), four_bit({64, 4, 16, 32, 16});
  c.codec = &g32;
  EXPECT_EQ(decode(c), op + "cache.k_pages: expected shape [3, 1, 2, 1024] [num_pages, page_size / G, Hkv, Kb]: G = 32, "
                            "Kb = 1024 bytes, a 2-bit key block of D = 64, got [3, 2, 2, 768] u8");
  c.codec = &g24;
  EXPECT_EQ(decode(c), op + "cache.v_pages: expected page_size a positive multiple of the codec's key_group G = 24, got "
                            "[3, 32, 2, 32] u8");
  c.codec = &four_bit;
  EXPECT_EQ(decode(c), op + "cache.v_pages: expected shape [*, *, 2, 48] [num_pages, page_size, Hkv, Vb]: Vb = 48 bytes, "
                            "a 4-bit value record of D = 64 in groups of 32, got [3, 32, 2, 32] u8");
  const Array ring_short(DType::f32, {1, 31, 2, 64}), ring_f16(DType::f16, {1, 32, 2, 64});
  c = engine.cache();
  c.recent_v = ring_short;
  EXPECT_EQ(decode(c), op + "cache.recent_v: expected shape [1, 32, 2, 64] [B, W, Hkv, D]: W = R + G = 16 + 16, got "
                            "[1, 31, 2, 64] f32");
  c = engine.cache();
  c.recent_k = ring_f16;
  EXPECT_EQ(decode(c), op + "cache.recent_k: expected dtype f32, got [1, 32, 2, 64] f16");
  const Array q3(DType::f32, {1, 3, 64}), q_i32(DType::i32, {1, 4, 64}), out_f16(DType::f16, {1, 4, 64});
  EXPECT_EQ(decode(engine.cache(), q3, q3),
            op + "heads: expected Hq a positive multiple of Hkv (GQA/MQA group), got Hq = 3, Hkv = 2");
  EXPECT_EQ(decode(engine.cache(), q_i32, q_i32), op + "q: expected dtype f32, f16 or bf16, got [1, 4, 64] i32");
  EXPECT_EQ(decode(engine.cache(), q, out_f16), op + "out: expected dtype f32 (the dtype of q), got [1, 4, 64] f16");
  // 70 tokens use all 3 entries of the table; a page index past the pool, a length past the
  // capacity, and no token at all.
  const Array bad_page = i32_array({1, 3}, {0, 1, 3}), too_long = i32_array({1}, {97}), empty = i32_array({1}, {0});
  c = engine.cache();
  c.page_table = bad_page;
  EXPECT_EQ(decode(c), op + "cache.page_table[0, 2]: expected a page index in [0, 3), got 3");
  c = engine.cache();
  c.lengths = too_long;
  EXPECT_EQ(decode(c), op + "lengths[0]: expected a length in [1, 96], got 97");
  c.lengths = empty;
  EXPECT_EQ(decode(c), op + "lengths[0]: expected a length in [1, 96], got 0");
}

void set_f32(std::span<uint8_t> record, int64_t at, float value) { std::memcpy(record.data() + 4 * at, &value, 4); }

TEST_P(KiviBadArgs, CorruptRecordsAreNamedWhereTheyAreRead) {
  const std::string op = "kivi_decode_attention_paged: ";
  const float nan = std::nanf(""), inf = std::numeric_limits<float>::infinity();
  // Key block of tokens 16..31, head 1: channel 5's scale (at 4 (D + 5)); value of token 20,
  // head 1: group 1's lo; value of token 16, head 1: group 0's scale. In (sequence, head, token)
  // order the key block comes first (it is named at token 16, before that token's value).
  set_f32(engine.key_block(0, 1, 16), 64 + 5, nan);
  set_f32(engine.value_record(0, 1, 20), 1, inf);
  set_f32(engine.value_record(0, 1, 16), 2, -1.0f);
  EXPECT_EQ(decode(engine.cache()), op + "cache.k_pages[sequence 0, tokens 16..31, KV head 1] scale[5]: expected a finite "
                                         "scale >= 0, got nan");
  set_f32(engine.key_block(0, 1, 16), 64 + 5, 0.5f);
  EXPECT_EQ(decode(engine.cache()), op + "cache.v_pages[sequence 0, token 16, KV head 1] scale[0]: expected a finite "
                                         "scale >= 0, got -1");
  set_f32(engine.value_record(0, 1, 16), 2, 0.5f);
  EXPECT_EQ(decode(engine.cache()), op + "cache.v_pages[sequence 0, token 20, KV head 1] lo[1]: expected a finite value, "
                                         "got inf");
  set_f32(engine.value_record(0, 1, 20), 1, 0.0f);
  // Token 60's value is in the ring (60 >= 70 - R) and the key block of 48..63 is not yet
  // quantized: whatever their pages hold is never read, until the length makes them records.
  set_f32(engine.value_record(0, 0, 60), 0, nan);
  set_f32(engine.key_block(0, 0, 48), 0, nan);
  EXPECT_EQ(decode(engine.cache()), "");
  for (int64_t i = 0; i < out.numel(); ++i) ASSERT_TRUE(std::isfinite(out.ptr<float>()[i])) << i;
  const Array longer = i32_array({1}, {77}), longest = i32_array({1}, {80});
  PagedKiviKV c = engine.cache();
  c.lengths = longer;  // values of [0, 61) quantized, keys still [0, 48)
  EXPECT_EQ(decode(c), op + "cache.v_pages[sequence 0, token 60, KV head 0] lo[0]: expected a finite value, got nan");
  c.lengths = longest;  // keys of [0, 64) quantized
  EXPECT_EQ(decode(c), op + "cache.k_pages[sequence 0, tokens 48..63, KV head 0] lo[0]: expected a finite value, got nan");
}

TEST_P(KiviBadArgs, Append) {
  const std::string op = "kivi_append_paged: ";
  Array k1(DType::f32, {1, 2, 64}), k5(DType::f32, {1, 5, 2, 64}), v5(DType::f32, {1, 5, 2, 64});
  // The calls that succeed encode these: finite values (a new Array's memory is not initialized).
  for (Array* a : {&k1, &k5, &v5}) std::fill_n(a->ptr<float>(), a->numel(), 0.25f);
  const auto append = [&](const Tensor& k, const Tensor& v, const PagedKiviKV& c) {
    return error_of([&] { kivi_append_paged(k, v, c, {GetParam()}); });
  };
  const Array k2d(DType::f32, {2, 64}), k_i32(DType::i32, {1, 5, 2, 64}), v_f16(DType::f16, {1, 5, 2, 64});
  const Array v4(DType::f32, {1, 4, 2, 64}), k_d40(DType::f32, {1, 5, 2, 40}), k_d48(DType::f32, {1, 5, 2, 48});
  const Array k_h3(DType::f32, {1, 5, 3, 64});
  const Array k_b2(DType::f32, {2, 5, 2, 64}), k_s0(DType::f32, {1, 0, 2, 64});
  EXPECT_EQ(append(k2d, k2d, engine.cache()), op + "k_new: expected [B, Hkv, D] (one new token per sequence) or "
                                                   "[B, S, Hkv, D], got [2, 64] f32");
  EXPECT_EQ(append(k_i32, k_i32, engine.cache()), op + "k_new: expected dtype f32, f16 or bf16, got [1, 5, 2, 64] i32");
  EXPECT_EQ(append(k_s0, k_s0, engine.cache()),
            op + "k_new: expected B >= 1, S >= 1 and at least one head, got [1, 0, 2, 64] f32");
  EXPECT_EQ(append(k5, v4, engine.cache()),
            op + "v_new: expected the shape of k_new [1, 5, 2, 64] f32, got [1, 4, 2, 64] f32");
  EXPECT_EQ(append(k5, v_f16, engine.cache()), op + "v_new: expected dtype f32 (the dtype of k_new), got [1, 5, 2, 64] f16");
  EXPECT_EQ(append(k_d40, k_d40, engine.cache()), op + "k_new: expected head_dim D a multiple of 16 in [16, 256], got D = 40");
  EXPECT_EQ(append(k_d48, k_d48, engine.cache()),
            op + "cache.codec: expected a codec for head_dim D = 48 (of k_new), got a codec for D = 64");
  const KiviCodec d128({128, 2, 16, 32, 16});
  PagedKiviKV c = engine.cache();
  c.codec = &d128;
  EXPECT_EQ(append(k5, v5, c), op + "cache.codec: expected a codec for head_dim D = 64 (of k_new), got a codec for D = 128");
  EXPECT_EQ(append(k_h3, k_h3, engine.cache()),
            op + "cache.v_pages: expected shape [*, *, 3, 32] [num_pages, page_size, Hkv, Vb]: Vb = 32 bytes, a 2-bit "
                 "value record of D = 64 in groups of 32, got [3, 32, 2, 32] u8");
  EXPECT_EQ(append(k_b2, k_b2, engine.cache()), op + "cache.recent_k: expected shape [2, 32, 2, 64] [B, W, Hkv, D]: "
                                                     "W = R + G = 16 + 16, got [1, 32, 2, 64] f32");
  // 70 tokens use pages 0..2 of the table, and so do 75: a bad third entry is named. With 60
  // tokens, the five new ones stay in the first two pages, and the third entry is not checked.
  const Array bad_page = i32_array({1, 3}, {0, 1, 3}), at_59 = i32_array({1}, {59});
  c = engine.cache();
  c.page_table = bad_page;
  EXPECT_EQ(append(k5, v5, c), op + "cache.page_table[0, 2]: expected a page index in [0, 3), got 3");
  // The capacity is 96: 92 + 5 do not fit.
  const Array too_long = i32_array({1}, {92});
  c = engine.cache();
  c.lengths = too_long;
  EXPECT_EQ(append(k5, v5, c), op + "lengths[0]: expected a length in [0, 91] so that 5 new tokens fit, got 92");
  // The good calls last, as they write: 70 + 5 tokens, one token in the decode form, and 59 + 5
  // tokens, which stay in the first two pages, so the bad third entry is not read.
  EXPECT_EQ(append(k5, v5, engine.cache()), "");
  EXPECT_EQ(append(k1, k1, engine.cache()), "");
  c = engine.cache();
  c.page_table = bad_page;
  c.lengths = at_59;
  EXPECT_EQ(append(k5, v5, c), "");
}

INSTANTIATE_TEST_SUITE_P(HostBackends, KiviBadArgs, ::testing::ValuesIn(kBackends));

// ---------------------------------------------------------------------------------------------
// The append against a cache built at once

// B sequences of T tokens, [B, T, Hkv, D] keys (with a per-channel offset) and values, exactly
// representable in `dtype`, and the caches of their first `length` tokens in kivi_cache.h's
// layout: one filled by kivi_append_paged in chunks, one built at once by KiviCache's rule.
class AppendCase {
 public:
  AppendCase(const KiviConfig& config, int64_t batch, int64_t hkv, int64_t page_size, int64_t tokens, DType dtype,
             uint64_t seed)
      : codec_(config), batch_(batch), hkv_(hkv), d_(config.head_dim), page_(page_size), tokens_(tokens),
        window_(config.residual + config.key_group), max_pages_((tokens + page_size - 1) / page_size), dtype_(dtype),
        keys_(size_t(batch * tokens * hkv * d_)), values_(keys_.size()) {
    verify::Rng rng(seed);
    for (size_t i = 0; i < keys_.size(); ++i) {
      keys_[i] = representable(float(rng.normal()) + float(int64_t(i) % d_ % 7) - 3.0f);
      values_[i] = representable(float(rng.normal()));
    }
    // Sequence b owns every B-th page from b, in reverse, so the pages of the sequences interleave.
    std::vector<int32_t> pages(static_cast<size_t>(batch * max_pages_));
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < max_pages_; ++i) pages[size_t(b * max_pages_ + i)] = int32_t((max_pages_ - 1 - i) * batch + b);
    }
    table_ = i32_array({batch, max_pages_}, pages);
    lengths_ = i32_array({batch}, std::vector<int32_t>(size_t(batch), 0));
    appended_ = empty_cache();
  }

  // kivi_append_paged of the next `count` tokens of every sequence on `backend`: [B, Hkv, D] for
  // one, [B, count, Hkv, D] for more.
  void append(int64_t count, const char* backend) {
    const std::vector<int64_t> shape =
        count == 1 ? std::vector<int64_t>{batch_, hkv_, d_} : std::vector<int64_t>{batch_, count, hkv_, d_};
    Array k_new(dtype_, std::span<const int64_t>(shape)), v_new(dtype_, std::span<const int64_t>(shape));
    const int64_t row = hkv_ * d_;
    for (int64_t b = 0; b < batch_; ++b) {
      for (int64_t i = 0; i < count * row; ++i) {
        const size_t from = size_t((b * tokens_ + length_) * row + i);
        store(k_new, (b * count * row) + i, keys_[from]);
        store(v_new, (b * count * row) + i, values_[from]);
      }
    }
    kivi_append_paged(k_new, v_new, view(appended_, length_), {backend});
    length_ += count;
  }

  int64_t length() const { return length_; }

  // The cache of the first length() tokens built at once: each key block and value record that
  // KiviCache's rule quantizes encoded from the tokens themselves, the rest copied to the ring.
  std::vector<Array> built_at_once() const {
    const KiviConfig& c = codec_.config();
    std::vector<Array> cache = empty_cache();
    const int64_t g = c.key_group, qk = detail::kivi_quantized_keys(length_, g, c.residual);
    const int64_t qv = detail::kivi_quantized_values(length_, c.residual);
    const int64_t kb = codec_.key_block_bytes(), vb = codec_.value_record_bytes();
    std::vector<float> block(static_cast<size_t>(g * d_));
    for (int64_t b = 0; b < batch_; ++b) {
      for (int64_t h = 0; h < hkv_; ++h) {
        for (int64_t t = 0; t < length_; ++t) {
          const int64_t slot = table_.ptr<int32_t>()[b * max_pages_ + t / page_] * page_ + t % page_;
          if (t < qk && t % g == 0) {
            for (int64_t i = 0; i < g; ++i) std::copy_n(token(keys_, b, t + i, h), d_, block.begin() + i * d_);
            codec_.encode_keys(block, {cache[0].ptr<uint8_t>() + (slot / g * hkv_ + h) * kb, size_t(kb)});
          }
          if (t < qv) {
            codec_.encode_value({token(values_, b, t, h), size_t(d_)},
                                {cache[1].ptr<uint8_t>() + (slot * hkv_ + h) * vb, size_t(vb)});
          }
          if (t >= qk) std::copy_n(token(keys_, b, t, h), d_, ring(cache[2], b, h, t));
          if (t >= qv) std::copy_n(token(values_, b, t, h), d_, ring(cache[3], b, h, t));
        }
      }
    }
    return cache;
  }

  // A view of `cache` (appended_ or built_at_once()) whose every sequence has `length` tokens;
  // the lengths are shared by all views, so only the latest one is valid.
  PagedKiviKV view(const std::vector<Array>& cache, int64_t length) const {
    for (int64_t b = 0; b < batch_; ++b) lengths_.ptr<int32_t>()[b] = int32_t(length);
    return {cache[0], cache[1], cache[2], cache[3], table_, lengths_, &codec_};
  }
  PagedKiviKV appended() const { return view(appended_, length_); }

  // The bytes that attention reads from the cache of length() tokens are the same in `at_once`
  // and the appended cache: the key blocks and value records below the quantized counts and the
  // ring slots of the rest. (Elsewhere the at-once cache holds zeros where the appended one holds
  // tokens already quantized out of the ring.)
  bool read_bytes_equal(const std::vector<Array>& at_once) const {
    const KiviConfig& c = codec_.config();
    const int64_t g = c.key_group, kb = codec_.key_block_bytes(), vb = codec_.value_record_bytes();
    const int64_t qk = detail::kivi_quantized_keys(length_, g, c.residual);
    const int64_t qv = detail::kivi_quantized_values(length_, c.residual);
    const auto same = [&](size_t i, int64_t at, int64_t n) {
      return std::memcmp(appended_[i].ptr<uint8_t>() + at, at_once[i].ptr<uint8_t>() + at, size_t(n)) == 0;
    };
    for (int64_t b = 0; b < batch_; ++b) {
      for (int64_t h = 0; h < hkv_; ++h) {
        for (int64_t t = 0; t < length_; ++t) {
          const int64_t slot = table_.ptr<int32_t>()[b * max_pages_ + t / page_] * page_ + t % page_;
          const int64_t ring_at = ((b * window_ + t % window_) * hkv_ + h) * d_ * 4;
          if (t < qk && t % g == 0 && !same(0, (slot / g * hkv_ + h) * kb, kb)) return false;
          if (t >= qk && !same(2, ring_at, d_ * 4)) return false;
          if (t < qv && !same(1, (slot * hkv_ + h) * vb, vb)) return false;
          if (t >= qv && !same(3, ring_at, d_ * 4)) return false;
        }
      }
    }
    return true;
  }

 private:
  float representable(float x) const {
    if (dtype_ == DType::f16) return f16_to_f32(f32_to_f16(x));
    if (dtype_ == DType::bf16) return bf16_to_f32(f32_to_bf16(x));
    return x;
  }
  static void store(const Array& a, int64_t i, float x) {
    const DType t = a.view().dtype;
    if (t == DType::f32) a.ptr<float>()[i] = x;
    if (t == DType::f16) a.ptr<uint16_t>()[i] = f32_to_f16(x);
    if (t == DType::bf16) a.ptr<uint16_t>()[i] = f32_to_bf16(x);
  }
  const float* token(const std::vector<float>& x, int64_t b, int64_t t, int64_t h) const {
    return x.data() + ((b * tokens_ + t) * hkv_ + h) * d_;
  }
  float* ring(const Array& a, int64_t b, int64_t h, int64_t t) const {
    return a.ptr<float>() + ((b * window_ + t % window_) * hkv_ + h) * d_;
  }
  // Zeroed pools and ring: every byte the two caches do not both write compares equal.
  std::vector<Array> empty_cache() const {
    const int64_t g = codec_.config().key_group;
    std::vector<Array> cache;
    cache.emplace_back(DType::u8, std::initializer_list<int64_t>{batch_ * max_pages_, page_ / g, hkv_, codec_.key_block_bytes()});
    cache.emplace_back(DType::u8, std::initializer_list<int64_t>{batch_ * max_pages_, page_, hkv_, codec_.value_record_bytes()});
    cache.emplace_back(DType::f32, std::initializer_list<int64_t>{batch_, window_, hkv_, d_});
    cache.emplace_back(DType::f32, std::initializer_list<int64_t>{batch_, window_, hkv_, d_});
    for (Array& a : cache) std::memset(a.data(), 0, a.nbytes());
    return cache;
  }

  KiviCodec codec_;
  int64_t batch_, hkv_, d_, page_, tokens_, window_, max_pages_;
  DType dtype_;
  std::vector<float> keys_, values_;
  Array table_, lengths_;
  std::vector<Array> appended_;
  int64_t length_ = 0;
};

TEST(KiviCacheAppend, MatchesACacheBuiltAtOnceFromTheSameTokens) {
  // Chunks of one token (the decode form) and of many, so that appends start and end inside the
  // window, inside a key block and on either side of a page boundary, and one append quantizes
  // several values and key blocks at once. After each, the bytes attention reads and attention
  // itself equal those of the cache built at once.
  constexpr int64_t kBatch = 2, kHkv = 2, kHq = 4, kD = 64, kPage = 32;
  const int64_t chunks[] = {1, 1, 30, 1, 3, 40, 1, 64, 2, 1, 97, 1};
  int64_t total = 0;
  for (const int64_t n : chunks) total += n;
  for (const char* backend : kBackends) {
    for (const auto& [config, dtype] : {std::pair{KiviConfig{kD, 2, 32, 32, 32}, DType::f32},
                                        std::pair{KiviConfig{kD, 4, 16, 16, 0}, DType::f16},
                                        std::pair{KiviConfig{kD, 2, 32, 64, 5}, DType::bf16}}) {
      SCOPED_TRACE(fmt::format("{}: {}-bit G = {} R = {}, {}", backend, config.bits, config.key_group, config.residual,
                               dtype_name(dtype)));
      AppendCase c(config, kBatch, kHkv, kPage, total, dtype, uint64_t(config.bits + config.residual));
      verify::Rng rng(3);
      for (const int64_t n : chunks) {
        c.append(n, backend);
        SCOPED_TRACE(fmt::format("length {}", c.length()));
        const std::vector<Array> at_once = c.built_at_once();
        EXPECT_TRUE(c.read_bytes_equal(at_once));
        Array q(DType::f32, {kBatch, kHq, kD}), out_appended(DType::f32, {kBatch, kHq, kD}),
            out_at_once(DType::f32, {kBatch, kHq, kD});
        verify::fill_normal(q, rng);
        kivi_decode_attention_paged(q, c.appended(), out_appended, {}, {"cpu"});
        kivi_decode_attention_paged(q, c.view(at_once, c.length()), out_at_once, {}, {"cpu"});
        EXPECT_EQ(std::memcmp(out_appended.data(), out_at_once.data(), out_at_once.nbytes()), 0);
      }
    }
  }
}

}  // namespace
}  // namespace decodelab
