// The paged RaBitQ-key / TurboQuant-value cache ops (rabitq_cache.h), on every backend that runs
// them: a cache filled through the codecs, or through rabitq_append_paged (whose records are the
// codecs' encodings bit for bit), gives softmax attention whose scores are RabitqKeys::estimate
// over the key records and whose values are TurboQuantMse's decoded value records, in plain math
// here; each bad argument and each corrupt record read gets an error naming it.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "decodelab/dtype.h"
#include "decodelab/rabitq_cache.h"
#include "error_of.h"
#include "record_cache_fixture.h"
#include "verify/random.h"

namespace decodelab {
namespace {

using kvquant::RabitqConfig;
using kvquant::RabitqKeys;
using kvquant::RotationKind;
using kvquant::ScaleMode;
using kvquant::TurboQuantMse;
using record_cache_test::normal;
using record_cache_test::relative_error;
using record_cache_test::set_f32;
using verify::i32_array;
using Cache = record_cache_test::RecordCache<RabitqKeys, PagedRabitqKV, rabitq_decode_attention_paged,
                                             rabitq_append_paged>;

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
        record_cache_test::expect_attention_over_estimates(cache, normal(rng, 3 * kHq * kD), kHq);
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
  for (const char* backend : record_cache_test::kHostBackends) {
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

// The shared bad-argument cache (record_cache_fixture.h) with 1-bit keys.
RabitqConfig bad_args_keys() { return {64, 1, 4, RotationKind::hadamard, 1, {}}; }
struct RabitqBadArgs : record_cache_test::BadArgs<Cache, bad_args_keys> {};

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
  record_cache_test::expect_shared_argument_errors(op, data, q, out, decoder());
}

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
  record_cache_test::expect_reads_stop_at_length(op, data, q, out, decoder());
}

TEST_P(RabitqBadArgs, Append) {
  const std::string op = "rabitq_append_paged: ";
  const auto append = [&](const Tensor& k, const Tensor& v, const PagedRabitqKV& c) {
    return error_of([&] { rabitq_append_paged(k, v, c, {GetParam()}); });
  };
  Array k1(DType::f32, {1, 2, 64}), k8(DType::f32, {1, 8, 2, 64}), v8(DType::f32, {1, 8, 2, 64});
  // The calls that succeed encode these: finite values (a new Array's memory is not initialized).
  for (Array* a : {&k1, &k8, &v8}) std::fill_n(a->ptr<float>(), a->numel(), 0.25f);
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
  record_cache_test::expect_page_table_errors(
      op, data, [&](const PagedRabitqKV& cache) { return append(k8, v8, cache); }, 41,
      "lengths[0]: expected a length in [0, 40] so that 8 new tokens fit, got 41");
  // The good calls last, as they write: 40 + 8 tokens, one token in the decode form, and 30 + 1,
  // which stays in the first two pages, so the bad third entry is not read.
  EXPECT_EQ(append(k8, v8, data.cache()), "");
  EXPECT_EQ(append(k1, k1, data.cache()), "");
  const Array bad_page = i32_array({1, 3}, {0, 1, 3}), at_30 = i32_array({1}, {30});
  c = data.cache();
  c.page_table = bad_page;
  c.lengths = at_30;
  EXPECT_EQ(append(k1, k1, c), "");
}

INSTANTIATE_TEST_SUITE_P(HostBackends, RabitqBadArgs, ::testing::ValuesIn(record_cache_test::kHostBackends));

}  // namespace
}  // namespace decodelab
