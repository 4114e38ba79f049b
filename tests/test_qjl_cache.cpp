// The paged QJL-key / TurboQuant-value cache ops (qjl_cache.h), on every backend that runs them:
// a cache filled through the codecs, or through qjl_append_paged (whose records are the codecs'
// encodings bit for bit), gives softmax attention whose scores are QjlKeys::estimate over the key
// records and whose values are TurboQuantMse's decoded value records, in plain math here; each bad
// argument and each corrupt record read gets an error naming it.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "decodelab/qjl_cache.h"
#include "error_of.h"
#include "record_cache_fixture.h"
#include "verify/random.h"

namespace decodelab {
namespace {

using kvquant::QjlConfig;
using kvquant::QjlKeys;
using kvquant::RotationKind;
using kvquant::ScaleMode;
using record_cache_test::normal;
using record_cache_test::relative_error;
using record_cache_test::set_f32;
using Cache = record_cache_test::RecordCache<QjlKeys, PagedQjlKV, qjl_decode_attention_paged, qjl_append_paged>;

// ---------------------------------------------------------------------------------------------
// Attention with QJL's estimated scores over TurboQuant's decoded values

TEST(QjlCacheAttention, MatchesSoftmaxOfEstimatedScoresOverDecodedValues) {
  // Lengths 1, a partial page, several pages and split-K tasks; sketches below, at and above D
  // against values at two widths.
  constexpr int64_t kD = 128, kHkv = 2, kHq = 8, kPage = 16;
  for (const int64_t m : {int64_t{48}, int64_t{128}, int64_t{384}}) {
    for (const int v_bits : {2, 4}) {
      SCOPED_TRACE(fmt::format("K QJL m = {}, V {}-bit", m, v_bits));
      const Cache cache(QjlConfig{kD, m, 5}, {kD, v_bits, RotationKind::hadamard, 6, ScaleMode::norm_corrected}, kHkv,
                        kPage, {1, 23, 300}, uint64_t(m + v_bits));
      verify::Rng rng(uint64_t(m * 3 + v_bits));
      record_cache_test::expect_attention_over_estimates(cache, normal(rng, 3 * kHq * kD), kHq);
    }
  }
}

TEST(QjlCacheAttention, ScoresFollowTheSketchNotTheKeysAlone) {
  // Two codecs of other seeds sketch the same keys differently: the op follows the codec's S
  // (projecting the query with a different S than the records' would change the output).
  constexpr int64_t kD = 64, kHq = 4;
  const Cache a(QjlConfig{kD, 64, 1}, {kD, 4}, 2, 16, {50}, 7), b(QjlConfig{kD, 64, 2}, {kD, 4}, 2, 16, {50}, 7);
  verify::Rng rng(3);
  const std::vector<float> q = normal(rng, kHq * kD);
  for (const char* backend : record_cache_test::kHostBackends) {
    SCOPED_TRACE(backend);
    EXPECT_LT(relative_error(a.attend(q, kHq, backend), a.expected(q, kHq)), 2e-6);
    EXPECT_LT(relative_error(b.attend(q, kHq, backend), b.expected(q, kHq)), 2e-6);
    EXPECT_GT(relative_error(a.attend(q, kHq, backend), b.expected(q, kHq)), 1e-3);
  }
}

// ---------------------------------------------------------------------------------------------
// The append

// A cache of B = 2 sequences at `lengths` with room for `capacity` tokens each: D = 128 keys
// sketched to m, 2-bit values, Hkv = 2, pages of 16.
Cache append_cache(int64_t m, std::vector<int32_t> lengths, int64_t capacity) {
  return Cache(QjlConfig{128, m, 5}, {128, 2, RotationKind::hadamard, 6, ScaleMode::plain}, 2, 16, std::move(lengths),
               11, capacity);
}

TEST(QjlCacheAppend, DecodeFormWritesTheEncodersRecordsAcrossPages) {
  // One token per sequence per call ([B, Hkv, D]), 20 times: sequence 0 from 14 crosses the page
  // boundary at 16, sequence 1 fills its first page from 0 and starts its second. Sketches below
  // and above D.
  const std::vector<int64_t> chunks(20, 1);
  for (const int64_t m : {int64_t{48}, int64_t{256}}) {
    SCOPED_TRACE(fmt::format("K QJL m = {}", m));
    record_cache_test::expect_appends_write_encoders_records([&] { return append_cache(m, {14, 0}, 14 + 20); }, chunks,
                                                             uint64_t(m));
  }
}

TEST(QjlCacheAppend, ManyTokensWriteTheEncodersRecordsAcrossPages) {
  // S > 1 new tokens per sequence ([B, S, Hkv, D]): sequence 0 from 3 to a page boundary (16),
  // several pages on (56) and to a boundary again (64); sequence 1 from 0 to inside a page (13),
  // then 53 and 61.
  const int64_t chunks[] = {13, 40, 8};
  for (const int64_t m : {int64_t{48}, int64_t{256}}) {
    SCOPED_TRACE(fmt::format("K QJL m = {}", m));
    record_cache_test::expect_appends_write_encoders_records([&] { return append_cache(m, {3, 0}, 3 + 61); }, chunks,
                                                             uint64_t(m) + 1);
  }
}

// ---------------------------------------------------------------------------------------------
// Bad arguments and corrupt records

// The shared bad-argument cache (record_cache_fixture.h) with a sketch of m = 64.
QjlConfig bad_args_keys() { return {64, 64, 1}; }
struct QjlBadArgs : record_cache_test::BadArgs<Cache, bad_args_keys> {};

TEST_P(QjlBadArgs, Arguments) {
  const std::string op = "qjl_decode_attention_paged: ";
  ASSERT_EQ(decode(data.cache()), "");  // the baseline is good: each case below breaks one thing
  PagedQjlKV c = data.cache();
  c.k_codec = nullptr;
  EXPECT_EQ(decode(c), op + "cache.k_codec: expected a QjlKeys codec, got null");
  const QjlKeys k128({128, 64, 1}), m40({64, 40, 1}), m128({64, 128, 1});
  c.k_codec = &k128;
  EXPECT_EQ(decode(c), op + "cache.k_codec: expected a codec for head_dim D = 64 (of q), got a codec for D = 128");
  c.k_codec = &m40;
  EXPECT_EQ(decode(c), op + "cache.k_codec: expected a sketch size m that is a multiple of 16, got a codec with "
                            "m = 40 (sketch_dim)");
  // Records of another sketch size have another length.
  c.k_codec = &m128;
  EXPECT_EQ(decode(c), op + "cache.k_pages: expected shape [*, *, 2, 20] [num_pages, page_size, Hkv, R]: R = 20 bytes, "
                            "a 1-bit sketch of m = 128 (cache.k_codec), got [3, 16, 2, 12] u8");
  record_cache_test::expect_shared_argument_errors(op, data, q, out, decoder());
}

TEST_P(QjlBadArgs, CorruptRecordsAreNamedWhereTheyAreRead) {
  const std::string op = "qjl_decode_attention_paged: ";
  const float nan = std::nanf(""), inf = std::numeric_limits<float>::infinity();
  // In (sequence, KV head, token) order, key before value: token 20's value norm and token 30's
  // key norm of KV head 1, after token 3's key norm of KV head 0.
  set_f32(data.key_record(0, 1, 30), 0, nan);
  set_f32(data.value_record(0, 1, 20), 0, -1.0f);
  set_f32(data.key_record(0, 0, 3), 0, inf);
  EXPECT_EQ(decode(data.cache()), op + "cache.k_pages[sequence 0, token 3, KV head 0] norm: expected a finite norm "
                                       ">= 0, got inf");
  set_f32(data.key_record(0, 0, 3), 0, 1.0f);
  EXPECT_EQ(decode(data.cache()), op + "cache.v_pages[sequence 0, token 20, KV head 1] norm: expected a finite norm "
                                       ">= 0, got -1");
  set_f32(data.value_record(0, 1, 20), 0, 1.0f);
  EXPECT_EQ(decode(data.cache()), op + "cache.k_pages[sequence 0, token 30, KV head 1] norm: expected a finite norm "
                                       ">= 0, got nan");
  set_f32(data.key_record(0, 1, 30), 0, -0.5f);
  EXPECT_EQ(decode(data.cache()), op + "cache.k_pages[sequence 0, token 30, KV head 1] norm: expected a finite norm "
                                       ">= 0, got -0.5");
  set_f32(data.key_record(0, 1, 30), 0, 2.0f);
  record_cache_test::expect_reads_stop_at_length(op, data, q, out, decoder());
}

TEST_P(QjlBadArgs, Append) {
  const std::string op = "qjl_append_paged: ";
  const auto append = [&](const Tensor& k, const Tensor& v, const PagedQjlKV& c) {
    return error_of([&] { qjl_append_paged(k, v, c, {GetParam()}); });
  };
  Array k8(DType::f32, {1, 8, 2, 64});
  std::fill_n(k8.ptr<float>(), k8.numel(), 0.25f);
  // A sketch no attention kernel reads is refused, as by attention; another sketch size has
  // records of another length.
  const QjlKeys m40({64, 40, 1}), m128({64, 128, 1});
  PagedQjlKV c = data.cache();
  c.k_codec = &m40;
  EXPECT_EQ(append(k8, k8, c), op + "cache.k_codec: expected a sketch size m that is a multiple of 16, got a codec "
                                    "with m = 40 (sketch_dim)");
  c.k_codec = &m128;
  EXPECT_EQ(append(k8, k8, c), op + "cache.k_pages: expected shape [*, *, 2, 20] [num_pages, page_size, Hkv, R]: "
                                    "R = 20 bytes, a 1-bit sketch of m = 128 (cache.k_codec), got [3, 16, 2, 12] u8");
  const QjlKeys k128({128, 64, 1});
  record_cache_test::expect_shared_append_errors(
      op, data, append, "QjlKeys", k128,
      "cache.k_pages: expected shape [*, *, 3, 12] [num_pages, page_size, Hkv, R]: R = 12 bytes, a 1-bit sketch of "
      "m = 64 (cache.k_codec), got [3, 16, 2, 12] u8");
}

INSTANTIATE_TEST_SUITE_P(HostBackends, QjlBadArgs, ::testing::ValuesIn(record_cache_test::kHostBackends));

}  // namespace
}  // namespace decodelab
