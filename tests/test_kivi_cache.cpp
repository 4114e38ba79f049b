// Fused decode attention over the paged KIVI cache (kivi_cache.h), on every backend that runs it:
// a cache filled token by token as an engine would fill it, through KiviCodec, gives attention
// over KiviCache's decoded keys() and values() for the same tokens; each bad argument and each
// corrupt record read gets an error naming it.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "decodelab/kivi_cache.h"
#include "error_of.h"
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

INSTANTIATE_TEST_SUITE_P(HostBackends, KiviBadArgs, ::testing::ValuesIn(kBackends));

}  // namespace
}  // namespace decodelab
