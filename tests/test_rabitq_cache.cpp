// The paged RaBitQ-key / TurboQuant-value cache ops (rabitq_cache.h), on every backend that runs
// them: a cache filled through the codecs, or through rabitq_append_paged (whose records are the
// codecs' encodings bit for bit), gives softmax attention whose scores are RabitqKeys::estimate
// over the key records and whose values are TurboQuantMse's decoded value records, in plain math
// here; each bad argument and each corrupt record read gets an error naming it.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

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
using record_cache_test::normal;
using record_cache_test::relative_error;
using record_cache_test::set_f32;
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
  // many ([B, S, Hkv, D]) that end inside a page, on a page boundary and several pages on.
  const int64_t chunks[] = {1, 12, 1, 1, 40, 3, 1};
  for (const int k_bits : {1, 3}) {
    SCOPED_TRACE(fmt::format("K {}-bit", k_bits));
    record_cache_test::expect_appends_write_encoders_records(
        [&] {
          return Cache({128, k_bits, 4, RotationKind::hadamard, 5, {}},
                       {128, 2, RotationKind::hadamard, 6, ScaleMode::plain}, 2, 16, {3, 0}, 11, 3 + 59);
        },
        chunks, uint64_t(k_bits) + 20);
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
  const auto append = [&](const Tensor& k, const Tensor& v, const PagedRabitqKV& c) {
    return error_of([&] { rabitq_append_paged(k, v, c, {GetParam()}); });
  };
  const RabitqKeys k128({128, 1, 4, RotationKind::hadamard, 1, {}});
  record_cache_test::expect_shared_append_errors(
      "rabitq_append_paged: ", data, append, "RabitqKeys", k128,
      "cache.k_pages: expected shape [*, *, 3, 16] [num_pages, page_size, Hkv, R]: R = 16 bytes, a 1-bit record of "
      "D = 64 (cache.k_codec), got [3, 16, 2, 16] u8");
}

INSTANTIATE_TEST_SUITE_P(HostBackends, RabitqBadArgs, ::testing::ValuesIn(record_cache_test::kHostBackends));

}  // namespace
}  // namespace decodelab
