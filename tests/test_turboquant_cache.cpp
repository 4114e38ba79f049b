// The paged TurboQuant cache ops (turboquant_cache.h), on every backend that runs them on the
// host: each bad argument of the append and of fused decode attention gets an error naming it.
#include <gtest/gtest.h>

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

INSTANTIATE_TEST_SUITE_P(HostBackends, BadArgs, ::testing::Values("reference", "cpu"));

}  // namespace
}  // namespace decodelab
