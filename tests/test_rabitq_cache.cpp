// The paged RaBitQ-key / TurboQuant-value cache ops (rabitq_cache.h), on every backend that runs
// them: a cache filled through the codecs, or through rabitq_append_paged (whose records are the
// codecs' encodings bit for bit), gives softmax attention whose scores are RabitqKeys::estimate
// over the key records and whose values are TurboQuantMse's decoded value records, in plain math
// here; each bad argument and each corrupt record read gets an error naming it.
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
#include "decodelab/rabitq_cache.h"
#include "error_of.h"
#include "verify/random.h"

namespace decodelab {
namespace {

using kvquant::RabitqConfig;
using kvquant::RabitqKeys;
using kvquant::RotationKind;
using kvquant::ScaleMode;
using kvquant::TurboQuantConfig;
using kvquant::TurboQuantMse;
using verify::i32_array;

constexpr const char* kBackends[] = {"reference", "cpu"};

float element(const Tensor& t, int64_t i);  // element i of an f32, f16 or bf16 tensor, as f32

// B sequences of `length` tokens each (their own lengths), Hkv heads, in pages of `page` slots;
// sequence b owns every B-th page from b, so the sequences' pages interleave. Keys are N(0, 1)
// plus a per-channel offset, values N(0, 1); the exact vectors are kept beside the records.
class Cache {
 public:
  // With room for `capacity` tokens per sequence (at least the longest length).
  Cache(const RabitqConfig& k, const TurboQuantConfig& v, int64_t hkv, int64_t page, std::vector<int32_t> lengths,
        uint64_t seed, int64_t capacity = 0)
      : k_codec_(k), v_codec_(v), batch_(int64_t(lengths.size())), hkv_(hkv), d_(k.head_dim), page_(page),
        max_pages_((std::max<int64_t>(*std::max_element(lengths.begin(), lengths.end()), capacity) + page - 1) / page),
        k_pages_(DType::u8, {batch_ * max_pages_, page, hkv, k_codec_.record_bytes()}),
        v_pages_(DType::u8, {batch_ * max_pages_, page, hkv, v_codec_.record_bytes()}),
        lengths_(i32_array({batch_}, lengths)) {
    std::vector<int32_t> pages(static_cast<size_t>(batch_ * max_pages_));
    for (int64_t b = 0; b < batch_; ++b) {
      for (int64_t i = 0; i < max_pages_; ++i) pages[size_t(b * max_pages_ + i)] = int32_t(i * batch_ + b);
    }
    table_ = i32_array({batch_, max_pages_}, pages);
    // Slots past a length hold 0xFF: a NaN norm, so a read past a length is an error.
    std::memset(k_pages_.data(), 0xFF, k_pages_.nbytes());
    std::memset(v_pages_.data(), 0xFF, v_pages_.nbytes());
    verify::Rng rng(seed);
    for (int64_t b = 0; b < batch_; ++b) {
      for (int64_t t = 0; t < length(b); ++t) {
        for (int64_t h = 0; h < hkv_; ++h) {
          std::vector<float> k(static_cast<size_t>(d_)), v(static_cast<size_t>(d_));
          for (int64_t j = 0; j < d_; ++j) {
            k[size_t(j)] = float(rng.normal()) + float(j % 5) - 2.0f;
            v[size_t(j)] = float(rng.normal());
          }
          k_codec_.encode(k, key_record(b, h, t));
          v_codec_.encode(v, value_record(b, h, t));
          exact_k_.insert(exact_k_.end(), k.begin(), k.end());
        }
      }
    }
  }

  PagedRabitqKV cache() const { return {k_pages_, v_pages_, table_, lengths_, &k_codec_, &v_codec_}; }
  int64_t length(int64_t b) const { return lengths_.ptr<int32_t>()[b]; }
  const RabitqKeys& k_codec() const { return k_codec_; }
  const TurboQuantMse& v_codec() const { return v_codec_; }

  // rabitq_append_paged of k_new, v_new ([B, Hkv, D] or [B, S, Hkv, D]) on `backend`, then the
  // lengths advanced; true when every record it wrote is the codecs' encoding of its token as
  // stored (widened to f32). The exact keys of the new tokens are not kept: expected() with
  // exact_keys covers the records made at construction only.
  bool append(const Array& k_new, const Array& v_new, const char* backend) {
    rabitq_append_paged(k_new, v_new, cache(), {backend});
    const Tensor& k = k_new.view();
    const int64_t tokens = k.rank == 4 ? k.dim(1) : 1;
    std::vector<float> x(static_cast<size_t>(d_));
    std::vector<uint8_t> record;
    bool same = true;
    const auto check = [&](const Tensor& src, int64_t row, const auto& codec, std::span<const uint8_t> written) {
      for (int64_t j = 0; j < d_; ++j) x[size_t(j)] = element(src, row * d_ + j);
      record.assign(written.size(), 0);
      codec.encode(x, record);
      same = same && std::equal(record.begin(), record.end(), written.begin());
    };
    for (int64_t b = 0; b < batch_; ++b) {
      for (int64_t s = 0; s < tokens; ++s) {
        for (int64_t h = 0; h < hkv_; ++h) {
          const int64_t row = (b * tokens + s) * hkv_ + h;
          check(k, row, k_codec_, key_record(b, h, length(b) + s));
          check(v_new.view(), row, v_codec_, value_record(b, h, length(b) + s));
        }
      }
      lengths_.ptr<int32_t>()[b] += int32_t(tokens);
    }
    return same;
  }

  std::span<uint8_t> key_record(int64_t b, int64_t h, int64_t t) const {
    const int64_t r = k_codec_.record_bytes();
    return {k_pages_.ptr<uint8_t>() + (slot(b, t) * hkv_ + h) * r, size_t(r)};
  }
  std::span<uint8_t> value_record(int64_t b, int64_t h, int64_t t) const {
    const int64_t r = v_codec_.record_bytes();
    return {v_pages_.ptr<uint8_t>() + (slot(b, t) * hkv_ + h) * r, size_t(r)};
  }

  // The op's output for q = [B, Hq, D] f32 on `backend`.
  std::vector<float> attend(const std::vector<float>& q, int64_t hq, const char* backend) const {
    Array q_array(DType::f32, {batch_, hq, d_}), out(DType::f32, {batch_, hq, d_});
    std::memcpy(q_array.data(), q.data(), q_array.nbytes());
    rabitq_decode_attention_paged(q_array, cache(), out, {}, {backend});
    return {out.ptr<float>(), out.ptr<float>() + out.numel()};
  }

  // Softmax attention in double with scale 1/sqrt(D): scores RabitqKeys::estimate over the key
  // records (or, with exact_keys, the exact dot products), values TurboQuantMse::decode.
  std::vector<double> expected(const std::vector<float>& q, int64_t hq, bool exact_keys = false) const {
    std::vector<double> out(q.size(), 0.0);
    std::vector<float> value(static_cast<size_t>(d_));
    for (int64_t b = 0; b < batch_; ++b) {
      for (int64_t head = 0; head < hq; ++head) {
        const int64_t h = head / (hq / hkv_), at = (b * hq + head) * d_;
        const std::span<const float> query(q.data() + at, size_t(d_));
        std::vector<double> scores;
        for (int64_t t = 0; t < length(b); ++t) {
          double score = 0.0;
          if (exact_keys) {
            const float* k = exact_k_.data() + (first_token(b) + t * hkv_ + h) * d_;
            for (int64_t j = 0; j < d_; ++j) score += double(query[size_t(j)]) * k[j];
          } else {
            score = k_codec_.estimate(query, key_record(b, h, t));
          }
          scores.push_back(score / std::sqrt(double(d_)));
        }
        const double top = *std::max_element(scores.begin(), scores.end());
        double sum = 0.0;
        for (int64_t t = 0; t < length(b); ++t) {
          const double p = std::exp(scores[size_t(t)] - top);
          sum += p;
          v_codec_.decode(value_record(b, h, t), value);
          for (int64_t j = 0; j < d_; ++j) out[size_t(at + j)] += p * value[size_t(j)];
        }
        for (int64_t j = 0; j < d_; ++j) out[size_t(at + j)] /= sum;
      }
    }
    return out;
  }

 private:
  int64_t slot(int64_t b, int64_t t) const { return table_.ptr<int32_t>()[b * max_pages_ + t / page_] * page_ + t % page_; }
  // Where sequence b's first exact key is, in key rows.
  int64_t first_token(int64_t b) const {
    int64_t rows = 0;
    for (int64_t i = 0; i < b; ++i) rows += length(i) * hkv_;
    return rows;
  }

  RabitqKeys k_codec_;
  TurboQuantMse v_codec_;
  int64_t batch_, hkv_, d_, page_, max_pages_;
  Array k_pages_, v_pages_, lengths_, table_;
  std::vector<float> exact_k_;
};

float element(const Tensor& t, int64_t i) {
  if (t.dtype == DType::f16) return f16_to_f32(t.ptr<uint16_t>()[i]);
  if (t.dtype == DType::bf16) return bf16_to_f32(t.ptr<uint16_t>()[i]);
  return t.ptr<float>()[i];
}

std::vector<float> normal(verify::Rng& rng, int64_t n) {
  std::vector<float> x(static_cast<size_t>(n));
  for (float& e : x) e = float(rng.normal());
  return x;
}

template <class A>
double relative_error(const std::vector<A>& out, const std::vector<double>& ref) {
  double err = 0.0, norm = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    err += (double(out[i]) - ref[i]) * (double(out[i]) - ref[i]);
    norm += ref[i] * ref[i];
  }
  return std::sqrt(err / norm);
}

// ---------------------------------------------------------------------------------------------
// Attention with RaBitQ's estimated scores over TurboQuant's decoded values

TEST(RabitqCacheAttention, MatchesSoftmaxOfEstimatedScoresOverDecodedValues) {
  // Lengths 1, a partial page, several pages and split-K tasks; RaBitQ and extended RaBitQ keys
  // against values at two widths; with and without a key centroid.
  constexpr int64_t kD = 128, kHkv = 2, kHq = 8, kPage = 16;
  for (const int k_bits : {1, 4}) {
    for (const int v_bits : {2, 4}) {
      for (const bool centroid : {false, true}) {
        SCOPED_TRACE(fmt::format("K {}-bit, V {}-bit{}", k_bits, v_bits, centroid ? ", centroid" : ""));
        RabitqConfig k{kD, k_bits, 4, RotationKind::hadamard, 5, {}};
        if (centroid) k.centroid.assign(size_t(kD), 0.75f);
        const Cache cache(k, {kD, v_bits, RotationKind::hadamard, 6, ScaleMode::norm_corrected}, kHkv, kPage,
                          {1, 23, 300}, uint64_t(k_bits * 10 + v_bits));
        verify::Rng rng(uint64_t(k_bits + v_bits));
        const std::vector<float> q = normal(rng, 3 * kHq * kD);
        const std::vector<double> expected = cache.expected(q, kHq);
        for (const char* backend : kBackends) {
          SCOPED_TRACE(backend);
          EXPECT_LT(relative_error(cache.attend(q, kHq, backend), expected), 2e-6);
        }
        // The check above would not miss a kernel that scored exact keys instead of the records:
        // the estimator's error moves the output well past that tolerance.
        EXPECT_GT(relative_error(cache.expected(q, kHq, true), expected), 1e-3);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The append

TEST(RabitqCacheAppend, WritesTheEncodersRecordsAndAttentionReadsThem) {
  // Sequences at lengths 3 and 0 take appends of one token (the decode form, [B, Hkv, D]) and of
  // many ([B, S, Hkv, D]) that end inside a page, on a page boundary and several pages on; in each
  // activation dtype, on each backend. Every record written is the encoders' and attention over
  // the grown cache matches the softmax of the estimated scores over the decoded values.
  constexpr int64_t kD = 128, kHkv = 2, kHq = 8, kPage = 16;
  const int64_t chunks[] = {1, 12, 1, 1, 40, 3, 1};
  for (const char* backend : kBackends) {
    for (const DType dtype : {DType::f32, DType::f16, DType::bf16}) {
      for (const int k_bits : {1, 3}) {
        SCOPED_TRACE(fmt::format("{}, {}, K {}-bit", backend, dtype_name(dtype), k_bits));
        Cache cache({kD, k_bits, 4, RotationKind::hadamard, 5, {}}, {kD, 2, RotationKind::hadamard, 6, ScaleMode::plain},
                    kHkv, kPage, {3, 0}, 11, 3 + 59);
        verify::Rng rng(uint64_t(k_bits) + 20);
        for (const int64_t n : chunks) {
          const std::vector<int64_t> shape =
              n == 1 ? std::vector<int64_t>{2, kHkv, kD} : std::vector<int64_t>{2, n, kHkv, kD};
          const Array k_new = verify::random_array(dtype, shape, rng), v_new = verify::random_array(dtype, shape, rng);
          ASSERT_TRUE(cache.append(k_new, v_new, backend));
          SCOPED_TRACE(fmt::format("lengths {} and {}", cache.length(0), cache.length(1)));
          const std::vector<float> q = normal(rng, 2 * kHq * kD);
          EXPECT_LT(relative_error(cache.attend(q, kHq, "cpu"), cache.expected(q, kHq)), 2e-6);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Bad arguments and corrupt records

// A valid cache for B = 1, Hkv = 2, D = 64, 1-bit keys, 2-bit values: 3 pages of 16 slots
// through a 3-entry page table (capacity 48), 40 tokens.
struct RabitqBadArgs : ::testing::TestWithParam<const char*> {
  Cache data{{64, 1, 4, RotationKind::hadamard, 1, {}},
             {64, 2, RotationKind::hadamard, 2, ScaleMode::plain},
             2,
             16,
             {40},
             3};
  Array q{DType::f32, {1, 4, 64}}, out{DType::f32, {1, 4, 64}};

  RabitqBadArgs() {
    verify::Rng rng(9);
    for (int64_t i = 0; i < q.numel(); ++i) q.ptr<float>()[i] = float(rng.normal());
  }
  std::string decode(const PagedRabitqKV& c, const Tensor& query, const Tensor& output) const {
    return error_of([&] { rabitq_decode_attention_paged(query, c, output, {}, {GetParam()}); });
  }
  std::string decode(const PagedRabitqKV& c) const { return decode(c, q, out); }
};

TEST_P(RabitqBadArgs, Arguments) {
  const std::string op = "rabitq_decode_attention_paged: ";
  ASSERT_EQ(decode(data.cache()), "");  // the baseline is good: each case below breaks one thing
  PagedRabitqKV c = data.cache();
  c.k_codec = nullptr;
  EXPECT_EQ(decode(c), op + "cache.k_codec: expected a RabitqKeys codec, got null");
  const RabitqKeys k128({128, 1, 4, RotationKind::hadamard, 1, {}}), k64_4bit({64, 4, 4, RotationKind::hadamard, 1, {}});
  c.k_codec = &k128;
  EXPECT_EQ(decode(c), op + "cache.k_codec: expected a codec for head_dim D = 64 (of q), got a codec for D = 128");
  c.k_codec = &k64_4bit;
  EXPECT_EQ(decode(c), op + "cache.k_pages: expected shape [*, *, 2, 40] [num_pages, page_size, Hkv, R]: R = 40 bytes, "
                            "a 4-bit record of D = 64 (cache.k_codec), got [3, 16, 2, 16] u8");
  c = data.cache();
  c.v_codec = nullptr;
  EXPECT_EQ(decode(c), op + "cache.v_codec: expected a TurboQuantMse codec, got null");
  const TurboQuantMse split({64, 2, RotationKind::hadamard, 2, ScaleMode::plain, 32}), v4({64, 4});
  c.v_codec = &split;
  EXPECT_EQ(decode(c), op + "cache.v_codec: expected a codec of one integer width (the fused kernels do not implement "
                            "split widths), got a split 2.5-bit codec (high_bits_channels = 32)");
  c.v_codec = &v4;
  EXPECT_EQ(decode(c), op + "cache.v_pages: expected shape [3, 16, 2, 36] [num_pages, page_size, Hkv, R]: R = 36 bytes, "
                            "a 4-bit record of D = 64 (cache.v_codec), got [3, 16, 2, 20] u8");
  const Array q3(DType::f32, {1, 3, 64}), q_i32(DType::i32, {1, 4, 64}), out_f16(DType::f16, {1, 4, 64});
  EXPECT_EQ(decode(data.cache(), q3, q3),
            op + "heads: expected Hq a positive multiple of Hkv (GQA/MQA group), got Hq = 3, Hkv = 2");
  EXPECT_EQ(decode(data.cache(), q_i32, q_i32), op + "q: expected dtype f32, f16 or bf16, got [1, 4, 64] i32");
  EXPECT_EQ(decode(data.cache(), q, out_f16), op + "out: expected dtype f32 (the dtype of q), got [1, 4, 64] f16");
  const Array bad_page = i32_array({1, 3}, {0, 1, 3}), too_long = i32_array({1}, {49}), empty = i32_array({1}, {0});
  c = data.cache();
  c.page_table = bad_page;
  EXPECT_EQ(decode(c), op + "cache.page_table[0, 2]: expected a page index in [0, 3), got 3");
  c = data.cache();
  c.lengths = too_long;
  EXPECT_EQ(decode(c), op + "lengths[0]: expected a length in [1, 48], got 49");
  c.lengths = empty;
  EXPECT_EQ(decode(c), op + "lengths[0]: expected a length in [1, 48], got 0");
}

void set_f32(std::span<uint8_t> record, int64_t at, float value) { std::memcpy(record.data() + 4 * at, &value, 4); }

TEST_P(RabitqBadArgs, CorruptRecordsAreNamedWhereTheyAreRead) {
  const std::string op = "rabitq_decode_attention_paged: ";
  const float nan = std::nanf(""), inf = std::numeric_limits<float>::infinity();
  // In (sequence, KV head, token) order, key before value, norm before correction: token 30's key
  // correction, token 20's value norm and token 20's key correction, all KV head 1.
  set_f32(data.key_record(0, 1, 30), 1, 0.0f);
  set_f32(data.value_record(0, 1, 20), 0, -1.0f);
  set_f32(data.key_record(0, 1, 20), 1, 1.5f);
  EXPECT_EQ(decode(data.cache()), op + "cache.k_pages[sequence 0, token 20, KV head 1] correction: expected a "
                                       "correction <o_bar, o> in (0, 1], got 1.5");
  set_f32(data.key_record(0, 1, 20), 1, 0.5f);
  EXPECT_EQ(decode(data.cache()), op + "cache.v_pages[sequence 0, token 20, KV head 1] norm: expected a finite norm "
                                       ">= 0, got -1");
  set_f32(data.value_record(0, 1, 20), 0, 1.0f);
  EXPECT_EQ(decode(data.cache()), op + "cache.k_pages[sequence 0, token 30, KV head 1] correction: expected a "
                                       "correction <o_bar, o> in (0, 1], got 0");
  set_f32(data.key_record(0, 1, 30), 1, 0.5f);
  set_f32(data.key_record(0, 0, 3), 0, inf);
  set_f32(data.key_record(0, 0, 3), 1, nan);
  EXPECT_EQ(decode(data.cache()), op + "cache.k_pages[sequence 0, token 3, KV head 0] norm: expected a finite norm "
                                       ">= 0, got inf");
  set_f32(data.key_record(0, 0, 3), 0, 1.0f);
  EXPECT_EQ(decode(data.cache()), op + "cache.k_pages[sequence 0, token 3, KV head 0] correction: expected a "
                                       "correction <o_bar, o> in (0, 1], got nan");
  set_f32(data.key_record(0, 0, 3), 1, 0.5f);
  // Records past the length are never read: the slots after token 39 hold 0xFF (NaN norms).
  const Array shorter = i32_array({1}, {39});
  PagedRabitqKV c = data.cache();
  set_f32(data.key_record(0, 0, 39), 0, nan);
  c.lengths = shorter;
  EXPECT_EQ(decode(c), "");
  for (int64_t i = 0; i < out.numel(); ++i) ASSERT_TRUE(std::isfinite(out.ptr<float>()[i])) << i;
  EXPECT_EQ(decode(data.cache()), op + "cache.k_pages[sequence 0, token 39, KV head 0] norm: expected a finite norm "
                                       ">= 0, got nan");
}

TEST_P(RabitqBadArgs, Append) {
  const std::string op = "rabitq_append_paged: ";
  const auto append = [&](const Tensor& k, const Tensor& v, const PagedRabitqKV& c) {
    return error_of([&] { rabitq_append_paged(k, v, c, {GetParam()}); });
  };
  const Array k1(DType::f32, {1, 2, 64}), k8(DType::f32, {1, 8, 2, 64}), v8(DType::f32, {1, 8, 2, 64});
  const Array k2d(DType::f32, {2, 64}), k_i32(DType::i32, {1, 8, 2, 64}), v_bf16(DType::bf16, {1, 8, 2, 64});
  const Array v7(DType::f32, {1, 7, 2, 64}), k_h3(DType::f32, {1, 8, 3, 64}), k_b2(DType::f32, {2, 8, 2, 64});
  const Array k_d40(DType::f32, {1, 8, 2, 40});
  EXPECT_EQ(append(k2d, k2d, data.cache()), op + "k_new: expected [B, Hkv, D] (one new token per sequence) or "
                                                 "[B, S, Hkv, D], got [2, 64] f32");
  EXPECT_EQ(append(k_i32, k_i32, data.cache()), op + "k_new: expected dtype f32, f16 or bf16, got [1, 8, 2, 64] i32");
  EXPECT_EQ(append(k8, v7, data.cache()), op + "v_new: expected the shape of k_new [1, 8, 2, 64] f32, got [1, 7, 2, 64] f32");
  EXPECT_EQ(append(k8, v_bf16, data.cache()), op + "v_new: expected dtype f32 (the dtype of k_new), got [1, 8, 2, 64] bf16");
  EXPECT_EQ(append(k_d40, k_d40, data.cache()), op + "k_new: expected head_dim D a multiple of 16 in [16, 256], got D = 40");
  PagedRabitqKV c = data.cache();
  c.k_codec = nullptr;
  EXPECT_EQ(append(k8, v8, c), op + "cache.k_codec: expected a RabitqKeys codec, got null");
  const RabitqKeys k128({128, 1, 4, RotationKind::hadamard, 1, {}});
  c.k_codec = &k128;
  EXPECT_EQ(append(k8, v8, c), op + "cache.k_codec: expected a codec for head_dim D = 64 (of k_new), got a codec for D = 128");
  const TurboQuantMse v128({128, 2});
  c = data.cache();
  c.v_codec = &v128;
  EXPECT_EQ(append(k8, v8, c), op + "cache.v_codec: expected a codec for head_dim D = 64 (of k_new), got a codec for D = 128");
  EXPECT_EQ(append(k_h3, k_h3, data.cache()),
            op + "cache.k_pages: expected shape [*, *, 3, 16] [num_pages, page_size, Hkv, R]: R = 16 bytes, a 1-bit "
                 "record of D = 64 (cache.k_codec), got [3, 16, 2, 16] u8");
  EXPECT_EQ(append(k_b2, k_b2, data.cache()), op + "cache.page_table: expected shape [2, *] [B, max_pages], got [1, 3] i32");
  // 40 + 8 tokens fill the 3 pages of the table exactly; 41 + 8 do not fit.
  const Array bad_page = i32_array({1, 3}, {0, 1, 3}), too_long = i32_array({1}, {41}), at_30 = i32_array({1}, {30});
  c = data.cache();
  c.page_table = bad_page;
  EXPECT_EQ(append(k8, v8, c), op + "cache.page_table[0, 2]: expected a page index in [0, 3), got 3");
  c = data.cache();
  c.lengths = too_long;
  EXPECT_EQ(append(k8, v8, c), op + "lengths[0]: expected a length in [0, 40] so that 8 new tokens fit, got 41");
  // The good calls last, as they write: 40 + 8 tokens, one token in the decode form, and 30 + 1,
  // which stays in the first two pages, so the bad third entry is not read.
  EXPECT_EQ(append(k8, v8, data.cache()), "");
  EXPECT_EQ(append(k1, k1, data.cache()), "");
  c.page_table = bad_page;
  c.lengths = at_30;
  EXPECT_EQ(append(k1, k1, c), "");
}

INSTANTIATE_TEST_SUITE_P(HostBackends, RabitqBadArgs, ::testing::ValuesIn(kBackends));

}  // namespace
}  // namespace decodelab
