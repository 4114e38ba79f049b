// The paged TurboQuant cache ops (turboquant_cache.h), on every backend that runs them on the
// host: each bad argument of the append and of fused decode attention gets an error naming it,
// and the fused attention's error against exact attention over the uncompressed K and V stays
// within what the codec's distortion predicts, at long contexts and for a single token.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "decodelab/turboquant_cache.h"
#include "error_of.h"
#include "verify/random.h"

namespace decodelab {
namespace {

using kvquant::TurboQuantMse;
using verify::i32_array;

// ---------------------------------------------------------------------------------------------
// Bad arguments

// A valid cache for B = 1, Hkv = 2, D = 64: 4 pages of 16 slots (capacity 48 through its
// 3-entry page table), 20 tokens; 4-bit keys (36-byte records) and 2-bit values (20 bytes), so a
// pool swapped for the other has the wrong record size. Every record below the length is the
// encoding of a vector, so a good call runs clean.
struct BadArgs : ::testing::TestWithParam<const char*> {
  TurboQuantMse k_codec{{64, 4, kvquant::RotationKind::hadamard, 1}};
  TurboQuantMse v_codec{{64, 2, kvquant::RotationKind::hadamard, 2}};
  Array k_pages{DType::u8, {4, 16, 2, 36}}, v_pages{DType::u8, {4, 16, 2, 20}};
  Array table = i32_array({1, 3}, {2, 1, 0}), lengths = i32_array({1}, {20});
  Array q{DType::f32, {1, 4, 64}}, out{DType::f32, {1, 4, 64}};
  Array k_new{DType::f32, {1, 2, 64}}, v_new{DType::f32, {1, 2, 64}};

  BadArgs() {
    verify::Rng rng(7);
    for (const Array* a : {&q, &k_new, &v_new}) {
      for (int64_t i = 0; i < a->numel(); ++i) a->ptr<float>()[i] = float(rng.normal());
    }
    std::vector<float> x(64);
    for (int64_t slot = 0; slot < 4 * 16 * 2; ++slot) {
      for (float& e : x) e = float(rng.normal());
      k_codec.encode(x, {k_pages.ptr<uint8_t>() + slot * 36, 36});
      v_codec.encode(x, {v_pages.ptr<uint8_t>() + slot * 20, 20});
    }
  }
  RunOptions run() const { return {GetParam()}; }
  PagedTurboQuantKV cache() const { return {k_pages, v_pages, table, lengths, &k_codec, &v_codec}; }
  std::string decode(const PagedTurboQuantKV& c, const Tensor& query) const {
    return error_of([&] { turboquant_decode_attention_paged(query, c, out, {}, run()); });
  }
  std::string decode(const PagedTurboQuantKV& c) const { return decode(c, q); }
  std::string append(const PagedTurboQuantKV& c, const Tensor& k) const {
    return error_of([&] { turboquant_append_paged(k, v_new, c, run()); });
  }
  std::string append(const PagedTurboQuantKV& c) const { return append(c, k_new); }
};

TEST_P(BadArgs, DecodeAttention) {
  const std::string op = "turboquant_decode_attention_paged: ";
  ASSERT_EQ(decode(cache()), "");  // the baseline is good: each case below breaks one thing
  PagedTurboQuantKV c = cache();
  c.k_codec = nullptr;
  EXPECT_EQ(decode(c), op + "cache.k_codec: expected a TurboQuantMse codec, got null");
  const TurboQuantMse codec128({128, 4});
  c = cache();
  c.v_codec = &codec128;
  EXPECT_EQ(decode(c), op + "cache.v_codec: expected a codec for head_dim D = 64 (of q), got a codec for D = 128");
  // A split width (kvquant.h) whose runs the kernels cannot expand 16 indices at a time.
  const TurboQuantMse split({64, 2, kvquant::RotationKind::hadamard, 2, kvquant::ScaleMode::plain, 24});
  c = cache();
  c.v_codec = &split;
  EXPECT_EQ(decode(c), op + "cache.v_codec: expected an integer width or a split one with high_bits_channels a multiple of "
                            "16 (the fused kernels expand 16 indices at a time), got a split 2.375-bit codec "
                            "(high_bits_channels = 24)");
  c = cache();
  c.v_pages = k_pages;  // 36-byte records where the 2-bit codec writes 20
  EXPECT_EQ(decode(c), op + "cache.v_pages: expected shape [4, 16, 2, 20] [num_pages, page_size, Hkv, R]: R = 20 bytes, "
                            "a 2-bit record of D = 64 (cache.v_codec), got [4, 16, 2, 36] u8");
  const Array q3(DType::f32, {1, 3, 64}), out3(DType::f32, {1, 3, 64});
  EXPECT_EQ(error_of([&] { turboquant_decode_attention_paged(q3, cache(), out3, {}, run()); }),
            op + "heads: expected Hq a positive multiple of Hkv (GQA/MQA group), got Hq = 3, Hkv = 2");
  c = cache();
  const Array bad_page = i32_array({1, 3}, {2, 4, 0});  // 20 tokens use pages 0 and 1 of the table
  c.page_table = bad_page;
  EXPECT_EQ(decode(c), op + "cache.page_table[0, 1]: expected a page index in [0, 4), got 4");
  const Array too_long = i32_array({1}, {49}), empty = i32_array({1}, {0});
  c = cache();
  c.lengths = too_long;
  EXPECT_EQ(decode(c), op + "lengths[0]: expected a length in [1, 48], got 49");
  c.lengths = empty;
  EXPECT_EQ(decode(c), op + "lengths[0]: expected a length in [1, 48], got 0");
  const Array q_i32(DType::i32, {1, 4, 64}), out_f16(DType::f16, {1, 4, 64}), pages_f16(DType::f16, {4, 16, 2, 36});
  EXPECT_EQ(decode(cache(), q_i32), op + "q: expected dtype f32, f16 or bf16, got [1, 4, 64] i32");
  EXPECT_EQ(error_of([&] { turboquant_decode_attention_paged(q, cache(), out_f16, {}, run()); }),
            op + "out: expected dtype f32 (the dtype of q), got [1, 4, 64] f16");
  c = cache();
  c.k_pages = pages_f16;
  EXPECT_EQ(decode(c), op + "cache.k_pages: expected dtype u8, got [4, 16, 2, 36] f16");
}

TEST_P(BadArgs, Append) {
  const std::string op = "turboquant_append_paged: ";
  ASSERT_EQ(append(cache()), "");
  PagedTurboQuantKV c = cache();
  c.v_codec = nullptr;
  EXPECT_EQ(append(c), op + "cache.v_codec: expected a TurboQuantMse codec, got null");
  const TurboQuantMse codec128({128, 4});
  c = cache();
  c.k_codec = &codec128;
  EXPECT_EQ(append(c), op + "cache.k_codec: expected a codec for head_dim D = 64 (of k_new), got a codec for D = 128");
  const TurboQuantMse split({64, 3, kvquant::RotationKind::hadamard, 1, kvquant::ScaleMode::plain, 8});
  c = cache();
  c.k_codec = &split;
  EXPECT_EQ(append(c), op + "cache.k_codec: expected an integer width or a split one with high_bits_channels a multiple of "
                            "16 (the fused kernels expand 16 indices at a time), got a split 3.125-bit codec "
                            "(high_bits_channels = 8)");
  c = cache();
  c.k_pages = v_pages;  // 20-byte records where the 4-bit codec writes 36
  EXPECT_EQ(append(c), op + "cache.k_pages: expected shape [*, *, 2, 36] [num_pages, page_size, Hkv, R]: R = 36 bytes, "
                            "a 4-bit record of D = 64 (cache.k_codec), got [4, 16, 2, 20] u8");
  // Token 32 goes into the third page of the table: that page must exist.
  const Array at_32 = i32_array({1}, {32}), bad_page = i32_array({1, 3}, {2, 1, -1});
  c = cache();
  c.lengths = at_32;
  c.page_table = bad_page;
  EXPECT_EQ(append(c), op + "cache.page_table[0, 2]: expected a page index in [0, 4), got -1");
  const Array full = i32_array({1}, {48}), negative = i32_array({1}, {-1}), empty = i32_array({1}, {0});
  c = cache();
  c.lengths = full;
  EXPECT_EQ(append(c), op + "lengths[0]: expected a length in [0, 47] so that 1 new tokens fit, got 48");
  c.lengths = negative;
  EXPECT_EQ(append(c), op + "lengths[0]: expected a length in [0, 47] so that 1 new tokens fit, got -1");
  c.lengths = empty;  // appending to an empty sequence is the first token, not an error
  EXPECT_EQ(append(c), "");
  const Array k_i32(DType::i32, {1, 2, 64}), v_f16(DType::f16, {1, 2, 64}), k_d72(DType::f32, {1, 2, 72});
  EXPECT_EQ(append(cache(), k_i32), op + "k_new: expected dtype f32, f16 or bf16, got [1, 2, 64] i32");
  EXPECT_EQ(error_of([&] { turboquant_append_paged(k_new, v_f16, cache(), run()); }),
            op + "v_new: expected dtype f32 (the dtype of k_new), got [1, 2, 64] f16");
  EXPECT_EQ(append(cache(), k_d72), op + "k_new: expected head_dim D a multiple of 16 in [16, 256], got D = 72");
  const Array table_u32(DType::u32, {1, 3});
  c = cache();
  c.page_table = table_u32;
  EXPECT_EQ(append(c), op + "cache.page_table: expected dtype i32, got [1, 3] u32");
}

TEST_P(BadArgs, CorruptRecordNorm) {
  // Records are 36 (K) and 20 (V) bytes, their f32 norm first; table {2, 1, 0}: token t of the
  // sequence, KV head h is record (page * 16 + t % 16) * 2 + h, page = table[t / 16].
  const auto set_norm = [](const Array& pool, int64_t record, float norm) {
    std::memcpy(pool.ptr<uint8_t>() + record * pool.view().dim(3), &norm, sizeof norm);  // little-endian host
  };
  const std::string op = "turboquant_decode_attention_paged: ";
  set_norm(k_pages, (2 * 16 + 5) * 2 + 1, std::nanf(""));                   // K, token 5, head 1
  set_norm(v_pages, (1 * 16 + 1) * 2 + 0, std::numeric_limits<float>::infinity());  // V, token 17, head 0
  set_norm(k_pages, (1 * 16 + 14) * 2 + 0, -1.0f);                          // K, token 30: past the length
  EXPECT_EQ(decode(cache()), op + "cache.v_pages[sequence 0, token 17, KV head 0] norm: expected a finite norm >= 0, got inf");
  set_norm(v_pages, (1 * 16 + 1) * 2 + 0, 1.0f);
  EXPECT_EQ(decode(cache()), op + "cache.k_pages[sequence 0, token 5, KV head 1] norm: expected a finite norm >= 0, got nan");
  set_norm(k_pages, (2 * 16 + 5) * 2 + 1, 1.0f);
  // Token 30 holds -1 but is never read; once the length covers it, it is.
  EXPECT_EQ(decode(cache()), "");
  for (int64_t i = 0; i < out.numel(); ++i) ASSERT_TRUE(std::isfinite(out.ptr<float>()[i])) << i;
  const Array longer = i32_array({1}, {31});
  PagedTurboQuantKV c = cache();
  c.lengths = longer;
  EXPECT_EQ(decode(c), op + "cache.k_pages[sequence 0, token 30, KV head 0] norm: expected a finite norm >= 0, got -1");
}

INSTANTIATE_TEST_SUITE_P(HostBackends, BadArgs, ::testing::Values("reference", "cpu"));

// ---------------------------------------------------------------------------------------------
// Quality of the fused cpu kernel against exact attention over the uncompressed K and V
//
// What to expect. Let eps = E||u - u~||^2 for a unit vector u (D * the codebook's distortion,
// about 0.0095 at 4 bits and 0.117 at 2 bits for D = 128): TurboQuant's error on a token depends
// on that token's vector alone and, after the random rotation, is spread evenly over directions.
// With q, k_t, v_t ~ N(0, I_D) and scale 1/sqrt(D), to first order in eps:
//  - values: sum_t p_t (v~_t - v_t) sums independent errors of squared norm eps_V ||v_t||^2, so
//    its E||.||^2 is eps_V sum_t p_t^2 ||v_t||^2;
//  - keys: the score error d_t = scale q.(k~_t - k_t) has variance scale^2 ||q||^2 eps_K ||k_t||^2
//    / D = eps_K; the weights move by p~_t - p_t = p_t (d_t - sum_s p_s d_s), independently of the
//    values, so sum_t (p~_t - p_t) v_t has E||.||^2 = eps_K sum_t p_t^2 ||v_t||^2;
//  - the exact output o = sum_t p_t v_t of independent zero-mean values has E||o||^2 =
//    sum_t p_t^2 ||v_t||^2.
// So the relative output error sqrt(sum ||out - o||^2 / sum ||o||^2) is about sqrt(eps_K + eps_V),
// whatever the length and however peaked the softmax: 0.14 at 4 bits, 0.48 at 2 bits. The tests
// allow 1.5 times that for the second-order terms (the softmax's curvature; plain mode shortens
// decoded vectors by eps, which shifts a dominant score by about eps times its size) and for the
// spread of the estimate over 16 heads, and ask for at least half of it, so that a comparison that
// misses the codec's error (the wrong vectors, or the codes not read at all) fails too.

constexpr int64_t kD = 128, kHkv = 2, kHq = 8, kBatch = 2, kPage = 16;

double predicted_error(const TurboQuantMse& k, const TurboQuantMse& v) {
  return std::sqrt(double(kD) * (k.codebook().distortion() + v.codebook().distortion()));
}

// A paged TurboQuant cache filled one token at a time through turboquant_append_paged, with the
// uncompressed K and V kept beside it: keys[b][t] is [Hkv * D] (values likewise).
class Context {
 public:
  Context(int bits, int64_t capacity)
      : k_codec_({kD, bits, kvquant::RotationKind::hadamard, 101}),
        v_codec_({kD, bits, kvquant::RotationKind::hadamard, 202}),
        max_pages_((capacity + kPage - 1) / kPage),
        k_pages_(DType::u8, {kBatch * max_pages_, kPage, kHkv, k_codec_.record_bytes()}),
        v_pages_(DType::u8, {kBatch * max_pages_, kPage, kHkv, v_codec_.record_bytes()}),
        keys_(kBatch), values_(kBatch) {
    // Sequence b owns every kBatch-th page from b, so the pages of the two interleave.
    std::vector<int32_t> pages(static_cast<size_t>(kBatch * max_pages_));
    for (int64_t b = 0; b < kBatch; ++b) {
      for (int64_t i = 0; i < max_pages_; ++i) pages[size_t(b * max_pages_ + i)] = int32_t(i * kBatch + b);
    }
    table_ = i32_array({kBatch, max_pages_}, pages);
    lengths_ = i32_array({kBatch}, std::vector<int32_t>(kBatch, 0));
  }

  // Appends k, v = [B, Hkv, D] as the next token of every sequence.
  void append(const std::vector<float>& k, const std::vector<float>& v) {
    Array k_new(DType::f32, {kBatch, kHkv, kD}), v_new(DType::f32, {kBatch, kHkv, kD});
    std::memcpy(k_new.data(), k.data(), k_new.nbytes());
    std::memcpy(v_new.data(), v.data(), v_new.nbytes());
    turboquant_append_paged(k_new, v_new, cache(), {"cpu"});
    for (int64_t b = 0; b < kBatch; ++b) {
      keys_[size_t(b)].emplace_back(k.begin() + b * kHkv * kD, k.begin() + (b + 1) * kHkv * kD);
      values_[size_t(b)].emplace_back(v.begin() + b * kHkv * kD, v.begin() + (b + 1) * kHkv * kD);
      ++lengths_.ptr<int32_t>()[b];
    }
  }

  void append_random(verify::Rng& rng) { append(normal(rng, kBatch * kHkv * kD), normal(rng, kBatch * kHkv * kD)); }

  // The fused cpu kernel's output for q = [B, Hq, D].
  std::vector<float> attend(const std::vector<float>& q) const {
    Array q_array(DType::f32, {kBatch, kHq, kD}), out(DType::f32, {kBatch, kHq, kD});
    std::memcpy(q_array.data(), q.data(), q_array.nbytes());
    turboquant_decode_attention_paged(q_array, cache(), out, {}, {"cpu"});
    return {out.ptr<float>(), out.ptr<float>() + out.numel()};
  }

  // Softmax attention of q over the uncompressed tokens, in double.
  std::vector<double> exact(const std::vector<float>& q) const {
    std::vector<double> out(q.size());
    const double scale = 1.0 / std::sqrt(double(kD));
    for (int64_t b = 0; b < kBatch; ++b) {
      const auto& keys = keys_[size_t(b)];
      const auto& values = values_[size_t(b)];
      for (int64_t h = 0; h < kHq; ++h) {
        const int64_t kv = h / (kHq / kHkv) * kD, at = (b * kHq + h) * kD;
        std::vector<double> scores(keys.size());
        for (size_t t = 0; t < keys.size(); ++t) {
          for (int64_t j = 0; j < kD; ++j) scores[t] += double(q[size_t(at + j)]) * keys[t][size_t(kv + j)] * scale;
        }
        const double top = *std::max_element(scores.begin(), scores.end());
        double sum = 0.0;
        for (size_t t = 0; t < keys.size(); ++t) {
          const double p = std::exp(scores[t] - top);
          sum += p;
          for (int64_t j = 0; j < kD; ++j) out[size_t(at + j)] += p * values[t][size_t(kv + j)];
        }
        for (int64_t j = 0; j < kD; ++j) out[size_t(at + j)] /= sum;
      }
    }
    return out;
  }

  const TurboQuantMse& k_codec() const { return k_codec_; }
  const TurboQuantMse& v_codec() const { return v_codec_; }
  // The record bytes of token t of sequence b, KV head h, in the value pool.
  std::span<const uint8_t> value_record(int64_t b, int64_t t, int64_t h) const {
    const int64_t page = table_.ptr<int32_t>()[b * max_pages_ + t / kPage], r = v_codec_.record_bytes();
    return {v_pages_.ptr<uint8_t>() + ((page * kPage + t % kPage) * kHkv + h) * r, size_t(r)};
  }

  static std::vector<float> normal(verify::Rng& rng, int64_t n) {
    std::vector<float> x(static_cast<size_t>(n));
    for (float& e : x) e = float(rng.normal());
    return x;
  }

 private:
  PagedTurboQuantKV cache() const { return {k_pages_, v_pages_, table_, lengths_, &k_codec_, &v_codec_}; }

  TurboQuantMse k_codec_, v_codec_;
  int64_t max_pages_;
  Array k_pages_, v_pages_, table_, lengths_;
  std::vector<std::vector<std::vector<float>>> keys_, values_;
};

template <class A, class B>
double relative_error(const std::vector<A>& out, const std::vector<B>& ref) {
  double err = 0.0, norm = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    err += (double(out[i]) - double(ref[i])) * (double(out[i]) - double(ref[i]));
    norm += double(ref[i]) * double(ref[i]);
  }
  return std::sqrt(err / norm);
}

// The most a measured error may exceed its first-order prediction by (see above).
constexpr double kAllowance = 1.5;

// A measured error is within [0.5, kAllowance] times its prediction.
void expect_predicted(double error, double predicted) {
  EXPECT_LT(error, kAllowance * predicted);
  EXPECT_GT(error, 0.5 * predicted);
}

TEST(TurboQuantCacheQuality, LongContextErrorFollowsTheDistortion) {
  // 300 tokens: several split-K tasks, a last tile and a last page that are partly filled.
  const int64_t length = 300;
  double error_at[5] = {};
  for (const int bits : {2, 4}) {
    SCOPED_TRACE(fmt::format("{}-bit K and V", bits));
    verify::Rng rng(uint64_t(40 + bits));
    Context context(bits, length);
    for (int64_t t = 0; t < length; ++t) context.append_random(rng);
    const std::vector<float> q = Context::normal(rng, kBatch * kHq * kD);
    const double predicted = predicted_error(context.k_codec(), context.v_codec());
    error_at[bits] = relative_error(context.attend(q), context.exact(q));
    std::cout << fmt::format("TurboQuant {}-bit K/V, {} tokens: relative output error {:.4f} (predicted {:.4f})\n", bits,
                             length, error_at[bits], predicted);
    expect_predicted(error_at[bits], predicted);
  }
  // Two more bits per coordinate cut the distortion about 12-fold, the error about 3.5-fold.
  EXPECT_LT(error_at[4], 0.4 * error_at[2]);
}

TEST(TurboQuantCacheQuality, SingleTokenIsTheDecodedValue) {
  // One token: the softmax weight is 1, so every query head of a group gets the token's decoded
  // value, to f32 rounding, and the error against the exact value is the value codec's alone.
  for (const int bits : {2, 4}) {
    SCOPED_TRACE(fmt::format("{}-bit K and V", bits));
    verify::Rng rng(uint64_t(50 + bits));
    Context context(bits, 1);
    context.append_random(rng);
    const std::vector<float> q = Context::normal(rng, kBatch * kHq * kD);
    const std::vector<float> out = context.attend(q);
    std::vector<float> decoded(static_cast<size_t>(kBatch * kHq * kD));
    for (int64_t b = 0; b < kBatch; ++b) {
      for (int64_t h = 0; h < kHq; ++h) {
        const int64_t at = (b * kHq + h) * kD;
        context.v_codec().decode(context.value_record(b, 0, h / (kHq / kHkv)), {decoded.data() + at, size_t(kD)});
      }
    }
    EXPECT_LT(relative_error(out, decoded), 1e-5);
    const double predicted = std::sqrt(double(kD) * context.v_codec().codebook().distortion());
    const double error = relative_error(out, context.exact(q));
    std::cout << fmt::format("TurboQuant {}-bit, one token: relative output error {:.4f} (predicted {:.4f})\n", bits,
                             error, predicted);
    expect_predicted(error, predicted);
  }
}

TEST(TurboQuantCacheQuality, FreshlyAppendedTokenIsAttended) {
  // 299 tokens, then one more whose key every query head points at (q = 8 k / ||k||: its score is
  // about 8, the others' about N(0, 0.5)), so that it carries about 90% of the weight. Without it
  // the output is another vector altogether; within the prediction, the kernel read the token the
  // append just wrote.
  const int64_t length = 300;
  for (const int bits : {2, 4}) {
    SCOPED_TRACE(fmt::format("{}-bit K and V", bits));
    verify::Rng rng(uint64_t(60 + bits));
    Context context(bits, length);
    for (int64_t t = 0; t + 1 < length; ++t) context.append_random(rng);
    const std::vector<float> k = Context::normal(rng, kBatch * kHkv * kD), v = Context::normal(rng, kBatch * kHkv * kD);
    std::vector<float> q(static_cast<size_t>(kBatch * kHq * kD));
    for (int64_t b = 0; b < kBatch; ++b) {
      for (int64_t h = 0; h < kHq; ++h) {
        const float* key = k.data() + (b * kHkv + h / (kHq / kHkv)) * kD;
        double norm2 = 0.0;
        for (int64_t j = 0; j < kD; ++j) norm2 += double(key[j]) * key[j];
        for (int64_t j = 0; j < kD; ++j) q[size_t((b * kHq + h) * kD + j)] = float(8.0 * key[j] / std::sqrt(norm2));
      }
    }
    const std::vector<double> without = context.exact(q);
    context.append(k, v);
    const std::vector<double> exact = context.exact(q);
    const double predicted = predicted_error(context.k_codec(), context.v_codec());
    ASSERT_GT(relative_error(without, exact), kAllowance * predicted);  // missing it cannot pass
    const double error = relative_error(context.attend(q), exact);
    std::cout << fmt::format("TurboQuant {}-bit, fresh token: relative output error {:.4f} (predicted {:.4f})\n", bits,
                             error, predicted);
    expect_predicted(error, predicted);
  }
}

}  // namespace
}  // namespace decodelab
