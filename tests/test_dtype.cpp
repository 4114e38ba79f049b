// f16/bf16 <-> f32 conversions: exhaustive round trips and correct rounding against independent
// oracles (the compiler's _Float16 and a nearest-neighbour search in double).
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <random>

#include "decodelab/dtype.h"

namespace decodelab {
namespace {

bool is_nan16(uint16_t h) { return (h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0; }
bool is_nan_bf16(uint16_t b) { return (b & 0x7F80) == 0x7F80 && (b & 0x7F) != 0; }

TEST(Dtype, F16RoundTripIsExactForEveryPattern) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = f16_to_f32(uint16_t(h));
    if (is_nan16(uint16_t(h))) {
      EXPECT_TRUE(std::isnan(f));
      EXPECT_TRUE(is_nan16(f32_to_f16(f)));
      continue;
    }
    ASSERT_EQ(f32_to_f16(f), h) << std::hex << h;
  }
}

TEST(Dtype, Bf16RoundTripIsExactForEveryPattern) {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = bf16_to_f32(uint16_t(b));
    if (is_nan_bf16(uint16_t(b))) {
      EXPECT_TRUE(std::isnan(f));
      EXPECT_TRUE(is_nan_bf16(f32_to_bf16(f)));
      continue;
    }
    ASSERT_EQ(f32_to_bf16(f), b) << std::hex << b;
  }
}

#if defined(__FLT16_MAX__)
// The compiler's _Float16 conversion is an independent round-to-nearest-even implementation.
TEST(Dtype, F16NarrowingMatchesFloat16EverywhereNearEveryF16) {
  int64_t checked = 0;
  for (uint32_t h = 0; h < 0x7C00; ++h) {  // every finite non-negative f16
    const float f = f16_to_f32(uint16_t(h));
    // The value itself, its f32 neighbours, and the midpoints to the next f16 and around them.
    const float next = f16_to_f32(uint16_t(h + 1));
    const float mid = float((double(f) + double(next)) / 2.0);
    for (float x : {f, std::nextafter(f, 0.0f), std::nextafter(f, INFINITY), mid, std::nextafter(mid, 0.0f),
                    std::nextafter(mid, INFINITY)}) {
      for (float s : {x, -x}) {
        const uint16_t expected = std::bit_cast<uint16_t>(static_cast<_Float16>(s));
        ASSERT_EQ(f32_to_f16(s), expected) << s;
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 300000);
}
#endif

// bf16 rounding checked against a nearest-neighbour search with ties to even.
TEST(Dtype, Bf16NarrowingRoundsToNearestEven) {
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    float x = std::bit_cast<float>(uint32_t(rng()));
    if (!std::isfinite(x) || std::fabs(x) > 3.3e38f) continue;
    if (i % 4 == 0) x = std::bit_cast<float>((std::bit_cast<uint32_t>(x) & 0xFFFF0000u) | 0x8000u);  // a tie
    const uint16_t lo = uint16_t(std::bit_cast<uint32_t>(x) >> 16);  // truncation, toward zero
    const uint16_t hi = uint16_t(lo + 1);
    const double dl = std::fabs(double(x) - bf16_to_f32(lo)), dh = std::fabs(double(bf16_to_f32(hi)) - x);
    const uint16_t expected = dl < dh ? lo : dh < dl ? hi : ((lo & 1) ? hi : lo);
    ASSERT_EQ(f32_to_bf16(x), expected) << x;
  }
}

TEST(Dtype, SpecialValues) {
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);  // the tie past the largest f16 rounds to infinity
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // a tie with zero goes to even
  EXPECT_EQ(f32_to_f16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(f32_to_bf16(INFINITY), 0x7F80);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

}  // namespace
}  // namespace decodelab
