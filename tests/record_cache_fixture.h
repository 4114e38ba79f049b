// What the tests of the paged record caches with TurboQuant values share (test_rabitq_cache.cpp,
// test_qjl_cache.cpp): a cache filled through the codecs (and grown through the cache's append op,
// where it has one), its expected output in plain math (softmax of the key codec's estimates over
// decoded values), the appends' checks (records the encoders', attention over them), and the
// errors every such op gives alike (the new tokens, the codecs and pools, q and out, the page
// table, lengths, corrupt norms).
#pragma once

#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "decodelab/attention.h"
#include "decodelab/dtype.h"
#include "decodelab/kvquant.h"
#include "decodelab/router.h"
#include "decodelab/tensor.h"
#include "error_of.h"
#include "verify/random.h"

namespace decodelab::record_cache_test {

// Element i of an f32, f16 or bf16 tensor, as f32.
inline float element(const Tensor& t, int64_t i) {
  if (t.dtype == DType::f16) return f16_to_f32(t.ptr<uint16_t>()[i]);
  if (t.dtype == DType::bf16) return bf16_to_f32(t.ptr<uint16_t>()[i]);
  return t.ptr<float>()[i];
}

// B sequences of `length` tokens each (their own lengths), Hkv heads, in pages of `page` slots;
// sequence b owns every B-th page from b, so the sequences' pages interleave. Keys are N(0, 1)
// plus a per-channel offset, values N(0, 1); the exact vectors are kept beside the records.
// KCodec has estimate(q, record); Paged is the op's cache view {k_pages, v_pages, page_table,
// lengths, &k codec, &v codec}; kOp the attention op, kAppendOp the append op (nullptr: none).
template <class KCodec, class Paged, auto kOp, auto kAppendOp = nullptr>
class RecordCache {
 public:
  using View = Paged;
  using KConfig = std::remove_cvref_t<decltype(std::declval<const KCodec&>().config())>;
  static constexpr auto kOpFn = kOp;

  // With room for `capacity` tokens per sequence (at least the longest length).
  RecordCache(const KConfig& k, const kvquant::TurboQuantConfig& v, int64_t hkv, int64_t page,
              std::vector<int32_t> lengths, uint64_t seed, int64_t capacity = 0)
      : k_codec_(k), v_codec_(v), batch_(int64_t(lengths.size())), hkv_(hkv), d_(k.head_dim), page_(page),
        max_pages_((std::max<int64_t>(*std::max_element(lengths.begin(), lengths.end()), capacity) + page - 1) / page),
        k_pages_(DType::u8, {batch_ * max_pages_, page, hkv, k_codec_.record_bytes()}),
        v_pages_(DType::u8, {batch_ * max_pages_, page, hkv, v_codec_.record_bytes()}),
        lengths_(verify::i32_array({batch_}, lengths)) {
    std::vector<int32_t> pages(static_cast<size_t>(batch_ * max_pages_));
    for (int64_t b = 0; b < batch_; ++b) {
      for (int64_t i = 0; i < max_pages_; ++i) pages[size_t(b * max_pages_ + i)] = int32_t(i * batch_ + b);
    }
    table_ = verify::i32_array({batch_, max_pages_}, pages);
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

  Paged cache() const { return {k_pages_, v_pages_, table_, lengths_, &k_codec_, &v_codec_}; }
  int64_t length(int64_t b) const { return lengths_.ptr<int32_t>()[b]; }

  // kAppendOp of k_new, v_new ([B, Hkv, D] or [B, S, Hkv, D]) on `backend`, then the lengths
  // advanced; true when every record it wrote is the codecs' encoding of its token as stored
  // (widened to f32). The exact keys of the new tokens are not kept: expected() with exact_keys
  // covers the records made at construction only.
  bool append(const Array& k_new, const Array& v_new, const char* backend) {
    kAppendOp(k_new, v_new, cache(), RunOptions{backend});
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
    kOp(q_array, cache(), out, AttentionOptions{}, RunOptions{backend});
    return {out.ptr<float>(), out.ptr<float>() + out.numel()};
  }

  // Softmax attention in double with scale 1/sqrt(D): scores k codec's estimate over the key
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

  KCodec k_codec_;
  kvquant::TurboQuantMse v_codec_;
  int64_t batch_, hkv_, d_, page_, max_pages_;
  Array k_pages_, v_pages_, lengths_, table_;
  std::vector<float> exact_k_;
};

inline std::vector<float> normal(verify::Rng& rng, int64_t n) {
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

// The host backends that run these ops.
inline constexpr const char* kHostBackends[] = {"reference", "cpu"};

// On every host backend the op's output for q (Hq heads) matches the softmax of the key codec's
// estimates over the decoded values (cache.expected) to f32 accuracy. The check would not miss a
// kernel that scored the exact keys instead of the records: the estimator's error moves the
// output well past its tolerance, which is checked too.
template <class Cache>
void expect_attention_over_estimates(const Cache& cache, const std::vector<float>& q, int64_t hq) {
  const std::vector<double> expected = cache.expected(q, hq);
  for (const char* backend : kHostBackends) {
    SCOPED_TRACE(backend);
    EXPECT_LT(relative_error(cache.attend(q, hq, backend), expected), 2e-6);
  }
  EXPECT_GT(relative_error(cache.expected(q, hq, true), expected), 1e-3);
}

inline void set_f32(std::span<uint8_t> record, int64_t at, float value) { std::memcpy(record.data() + 4 * at, &value, 4); }

// Appends to a cache from make_cache() (B = 2 sequences of Hkv = 2 heads of D = 128 with room for
// every chunk, a RecordCache with an append op) the chunks of new tokens in order, N(0, 1) draws:
// a chunk of 1 in the decode form [B, Hkv, D], of n > 1 as [B, n, Hkv, D]; in each activation
// dtype, on each host backend. Every record each append writes is the encoders' (RecordCache::
// append), and attention over the grown cache (Hq = 8, on cpu) matches the softmax of the
// estimated scores over the decoded values.
template <class MakeCache>
void expect_appends_write_encoders_records(const MakeCache& make_cache, std::span<const int64_t> chunks,
                                           uint64_t seed) {
  constexpr int64_t kB = 2, kHkv = 2, kD = 128, kHq = 8;
  for (const char* backend : kHostBackends) {
    for (const DType dtype : {DType::f32, DType::f16, DType::bf16}) {
      SCOPED_TRACE(fmt::format("{}, {}", backend, dtype_name(dtype)));
      auto cache = make_cache();
      verify::Rng rng(seed);
      for (const int64_t n : chunks) {
        const std::vector<int64_t> shape =
            n == 1 ? std::vector<int64_t>{kB, kHkv, kD} : std::vector<int64_t>{kB, n, kHkv, kD};
        const Array k_new = verify::random_array(dtype, shape, rng), v_new = verify::random_array(dtype, shape, rng);
        ASSERT_TRUE(cache.append(k_new, v_new, backend));
        SCOPED_TRACE(fmt::format("lengths {} and {}", cache.length(0), cache.length(1)));
        const std::vector<float> q = normal(rng, kB * kHq * kD);
        EXPECT_LT(relative_error(cache.attend(q, kHq, "cpu"), cache.expected(q, kHq)), 2e-6);
      }
    }
  }
}

// The bad-argument fixture's value codec: D = 64, 2 bits, plain scale.
inline kvquant::TurboQuantConfig bad_args_value_config() {
  return {64, 2, kvquant::RotationKind::hadamard, 2, kvquant::ScaleMode::plain};
}

// The bad-argument fixture, per host backend: a valid cache of B = 1, Hkv = 2, D = 64 with keys
// of kKeyConfig() and 2-bit values (bad_args_value_config), 3 pages of 16 slots through a 3-entry
// page table (capacity 48), 40 tokens; q = [1, 4, 64] f32 and out.
template <class Cache, auto kKeyConfig>
struct BadArgs : ::testing::TestWithParam<const char*> {
  using View = typename Cache::View;
  Cache data{kKeyConfig(), bad_args_value_config(), 2, 16, {40}, 3};
  Array q{DType::f32, {1, 4, 64}}, out{DType::f32, {1, 4, 64}};

  BadArgs() {
    verify::Rng rng(9);
    for (int64_t i = 0; i < q.numel(); ++i) q.ptr<float>()[i] = float(rng.normal());
  }
  // The op's error on this backend ("" if none).
  std::string decode(const View& c, const Tensor& query, const Tensor& output) const {
    return error_of([&] { Cache::kOpFn(query, c, output, AttentionOptions{}, RunOptions{this->GetParam()}); });
  }
  std::string decode(const View& c) const { return decode(c, q, out); }
  // decode() as the shared checks below call it.
  auto decoder() const {
    return [this](const View& c, const Tensor& query, const Tensor& output) { return decode(c, query, output); };
  }
};

// For `data`'s cache (below), the errors of its page table and lengths: a page index past the
// pool, and lengths[0] = too_long, whose error (after `op`) is length_error. call(cache) is the
// op's error over a cache view ("" if none).
template <class Data, class Call>
void expect_page_table_errors(const std::string& op, const Data& data, const Call& call, int32_t too_long,
                              const std::string& length_error) {
  const Array bad_page = verify::i32_array({1, 3}, {0, 1, 3}), lengths = verify::i32_array({1}, {too_long});
  auto c = data.cache();
  c.page_table = bad_page;
  EXPECT_EQ(call(c), op + "cache.page_table[0, 2]: expected a page index in [0, 3), got 3");
  c = data.cache();
  c.lengths = lengths;
  EXPECT_EQ(call(c), op + length_error);
}

// For the bad-argument fixture's cache `data` (BadArgs above), the errors every append op into
// such a cache gives alike: the new tokens' shapes and dtypes, a null key codec (`key_kind` its
// type, "RabitqKeys"), a key codec for D = 128 (k128) and a value codec for D = 128, k_pages for
// another Hkv (k_pages_for_3_heads: the error's text after `op`, as its record length is the key
// codec's), the page table and lengths; then the good calls, which write (40 + 8 tokens fill the
// 3 pages exactly; one token in the decode form; and 30 + 1, which stays in the first two pages,
// so a bad third page entry is not read). append(k_new, v_new, cache) is the op's error ("" if
// none); `op` its prefix ("name: ").
template <class Data, class Append, class KCodec>
void expect_shared_append_errors(const std::string& op, const Data& data, const Append& append, const char* key_kind,
                                 const KCodec& k128, const std::string& k_pages_for_3_heads) {
  Array k1(DType::f32, {1, 2, 64}), k8(DType::f32, {1, 8, 2, 64}), v8(DType::f32, {1, 8, 2, 64});
  // The calls that succeed encode these: finite values (a new Array's memory is not initialized).
  for (Array* a : {&k1, &k8, &v8}) std::fill_n(a->ptr<float>(), a->numel(), 0.25f);
  // The calls that fail never read theirs; filled all the same.
  Array k2d(DType::f32, {2, 64}), k_i32(DType::i32, {1, 8, 2, 64}), v_bf16(DType::bf16, {1, 8, 2, 64});
  Array v7(DType::f32, {1, 7, 2, 64}), k_h3(DType::f32, {1, 8, 3, 64}), k_b2(DType::f32, {2, 8, 2, 64});
  Array k_d40(DType::f32, {1, 8, 2, 40});
  for (Array* a : {&k2d, &k_i32, &v_bf16, &v7, &k_h3, &k_b2, &k_d40}) std::memset(a->data(), 0, a->nbytes());
  EXPECT_EQ(append(k2d, k2d, data.cache()), op + "k_new: expected [B, Hkv, D] (one new token per sequence) or "
                                                 "[B, S, Hkv, D], got [2, 64] f32");
  EXPECT_EQ(append(k_i32, k_i32, data.cache()), op + "k_new: expected dtype f32, f16 or bf16, got [1, 8, 2, 64] i32");
  EXPECT_EQ(append(k8, v7, data.cache()), op + "v_new: expected the shape of k_new [1, 8, 2, 64] f32, got [1, 7, 2, 64] f32");
  EXPECT_EQ(append(k8, v_bf16, data.cache()), op + "v_new: expected dtype f32 (the dtype of k_new), got [1, 8, 2, 64] bf16");
  EXPECT_EQ(append(k_d40, k_d40, data.cache()), op + "k_new: expected head_dim D a multiple of 16 in [16, 256], got D = 40");
  auto c = data.cache();
  c.k_codec = nullptr;
  EXPECT_EQ(append(k8, v8, c), op + fmt::format("cache.k_codec: expected a {} codec, got null", key_kind));
  c.k_codec = &k128;
  EXPECT_EQ(append(k8, v8, c), op + "cache.k_codec: expected a codec for head_dim D = 64 (of k_new), got a codec for D = 128");
  const kvquant::TurboQuantMse v128({128, 2});
  c = data.cache();
  c.v_codec = &v128;
  EXPECT_EQ(append(k8, v8, c), op + "cache.v_codec: expected a codec for head_dim D = 64 (of k_new), got a codec for D = 128");
  EXPECT_EQ(append(k_h3, k_h3, data.cache()), op + k_pages_for_3_heads);
  EXPECT_EQ(append(k_b2, k_b2, data.cache()), op + "cache.page_table: expected shape [2, *] [B, max_pages], got [1, 3] i32");
  // 40 + 8 tokens fill the 3 pages of the table exactly; 41 + 8 do not fit.
  expect_page_table_errors(
      op, data, [&](const auto& cache) { return append(k8, v8, cache); }, 41,
      "lengths[0]: expected a length in [0, 40] so that 8 new tokens fit, got 41");
  // The good calls last, as they write.
  EXPECT_EQ(append(k8, v8, data.cache()), "");
  EXPECT_EQ(append(k1, k1, data.cache()), "");
  const Array bad_page = verify::i32_array({1, 3}, {0, 1, 3}), at_30 = verify::i32_array({1}, {30});
  c = data.cache();
  c.page_table = bad_page;
  c.lengths = at_30;
  EXPECT_EQ(append(k1, k1, c), "");
}

// For `data`, a valid cache of B = 1, Hkv = 2, D = 64 with 2-bit values (bad_args_value_config),
// 3 pages of 16 slots through a 3-entry page table (capacity 48) and 40 tokens, q = [1, 4, 64]
// f32: the errors every op over such a cache gives alike, the value codec's and pool's, q's and
// out's, the page table's and the lengths'. decode(cache, q, out) is the op's error ("" if none);
// `op` its prefix ("name: ").
template <class Data, class Decode>
void expect_shared_argument_errors(const std::string& op, const Data& data, const Tensor& q, const Tensor& out,
                                   const Decode& decode) {
  auto c = data.cache();
  c.v_codec = nullptr;
  EXPECT_EQ(decode(c, q, out), op + "cache.v_codec: expected a TurboQuantMse codec, got null");
  const kvquant::TurboQuantMse split({64, 2, kvquant::RotationKind::hadamard, 2, kvquant::ScaleMode::plain, 24}),
      v4({64, 4});
  c.v_codec = &split;
  EXPECT_EQ(decode(c, q, out), op + "cache.v_codec: expected an integer width or a split one with high_bits_channels a "
                                    "multiple of 16 (the fused kernels expand 16 indices at a time), got a split "
                                    "2.375-bit codec (high_bits_channels = 24)");
  c.v_codec = &v4;
  EXPECT_EQ(decode(c, q, out), op + "cache.v_pages: expected shape [3, 16, 2, 36] [num_pages, page_size, Hkv, R]: "
                                    "R = 36 bytes, a 4-bit record of D = 64 (cache.v_codec), got [3, 16, 2, 20] u8");
  const Array q3(DType::f32, {1, 3, 64}), q_i32(DType::i32, {1, 4, 64}), out_f16(DType::f16, {1, 4, 64});
  EXPECT_EQ(decode(data.cache(), q3, q3),
            op + "heads: expected Hq a positive multiple of Hkv (GQA/MQA group), got Hq = 3, Hkv = 2");
  EXPECT_EQ(decode(data.cache(), q_i32, q_i32), op + "q: expected dtype f32, f16 or bf16, got [1, 4, 64] i32");
  EXPECT_EQ(decode(data.cache(), q, out_f16), op + "out: expected dtype f32 (the dtype of q), got [1, 4, 64] f16");
  const auto call = [&](const auto& cache) { return decode(cache, q, out); };
  expect_page_table_errors(op, data, call, 49, "lengths[0]: expected a length in [1, 48], got 49");
  const Array empty = verify::i32_array({1}, {0});
  c = data.cache();
  c.lengths = empty;
  EXPECT_EQ(decode(c, q, out), op + "lengths[0]: expected a length in [1, 48], got 0");
}

// For the same cache: records past the length are never read (the slots after token 39 hold
// 0xFF, NaN norms, and key record 39's norm is set to NaN), and a corrupt norm within it is named.
// Leaves key record 39 corrupt.
template <class Data, class Decode>
void expect_reads_stop_at_length(const std::string& op, const Data& data, const Tensor& q, const Tensor& out,
                                 const Decode& decode) {
  const Array shorter = verify::i32_array({1}, {39});
  auto c = data.cache();
  set_f32(data.key_record(0, 0, 39), 0, std::nanf(""));
  c.lengths = shorter;
  EXPECT_EQ(decode(c, q, out), "");
  for (int64_t i = 0; i < out.numel(); ++i) ASSERT_TRUE(std::isfinite(out.template ptr<float>()[i])) << i;
  EXPECT_EQ(decode(data.cache(), q, out), op + "cache.k_pages[sequence 0, token 39, KV head 0] norm: expected a "
                                               "finite norm >= 0, got nan");
}

}  // namespace decodelab::record_cache_test
