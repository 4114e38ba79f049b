// KV-cache quantization: bit-packing round trips and layout.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <iostream>
#include <limits>
#include <numbers>
#include <random>
#include <span>
#include <vector>

#include "decodelab/kv_quant.h"
#include "error_of.h"
#include "verify/random.h"

namespace decodelab::kvquant {
namespace {

using verify::Rng;

// ---------------------------------------------------------------------------------------------
// Bit packing

TEST(KvBitPack, RoundTripsAtEveryWidthAndLength) {
  Rng rng(11);
  for (int bits = 1; bits <= 4; ++bits) {
    for (size_t n : {1, 7, 31, 33, 96, 128, 255}) {
      SCOPED_TRACE(fmt::format("bits {}, n {}", bits, n));
      std::vector<uint8_t> values(n);
      for (uint8_t& v : values) v = uint8_t(rng.uniform_int(0, (1 << bits) - 1));
      values.back() = uint8_t((1 << bits) - 1);  // the largest value, in the last (partial) byte
      ASSERT_EQ(packed_bytes(int64_t(n), bits), int64_t((n * size_t(bits) + 7) / 8));
      std::vector<uint8_t> packed(size_t(packed_bytes(int64_t(n), bits)), 0xA5);  // poisoned
      pack_bits(values, bits, packed);
      // The layout, bit by bit: bit i of value j is stream bit j * bits + i.
      for (size_t j = 0; j < n; ++j) {
        for (int i = 0; i < bits; ++i) {
          const size_t k = j * size_t(bits) + size_t(i);
          ASSERT_EQ((packed[k / 8] >> (k % 8)) & 1, (values[j] >> i) & 1) << "value " << j << " bit " << i;
        }
      }
      const size_t used_bits = n * size_t(bits);
      if (used_bits % 8 != 0) {
        EXPECT_EQ(packed.back() >> (used_bits % 8), 0) << "spare high bits must be zero";
      }
      std::vector<uint8_t> back(n, 0xFF);
      unpack_bits(packed, bits, back);
      EXPECT_EQ(back, values);
    }
  }
}

TEST(KvBitPack, KnownBytes) {
  // 3 bits: sum of v_j << 3j over 1..7, 0 is 0x1F58D1, three bytes little-endian.
  const std::vector<uint8_t> three{1, 2, 3, 4, 5, 6, 7, 0};
  std::vector<uint8_t> packed(3);
  pack_bits(three, 3, packed);
  EXPECT_EQ(packed, (std::vector<uint8_t>{0xD1, 0x58, 0x1F}));
  const std::vector<uint8_t> two{3, 0, 1, 2, 1};  // 3 | 1 << 4 | 2 << 6 = 0x93, then 0x01
  packed.assign(2, 0);
  pack_bits(two, 2, packed);
  EXPECT_EQ(packed, (std::vector<uint8_t>{0x93, 0x01}));
  const std::vector<uint8_t> four{0x1, 0x2, 0xF};  // low nibble first
  packed.assign(2, 0);
  pack_bits(four, 4, packed);
  EXPECT_EQ(packed, (std::vector<uint8_t>{0x21, 0x0F}));
}

TEST(KvBitPack, SignBits) {
  std::vector<float> x(33);
  for (size_t j = 0; j < x.size(); ++j) x[j] = (j % 3 == 0 ? -1.0f : 1.0f) * float(j + 1) * 0.25f;
  x[1] = 0.0f;
  x[2] = -0.0f;  // reads as +1, like +0
  std::vector<uint8_t> packed(5, 0xA5);
  pack_signs(x, packed);
  EXPECT_EQ(packed[0], 0b01001001);  // x[0], x[3], x[6] negative
  std::vector<float> signs(33, 0.0f);
  unpack_signs(packed, signs);
  for (size_t j = 0; j < x.size(); ++j) EXPECT_EQ(signs[j], x[j] < 0.0f ? -1.0f : 1.0f) << j;
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST(KvErrors, BitPacking) {
  std::vector<uint8_t> values(31, 1), packed(11);
  EXPECT_ERROR(pack_bits(values, 5, packed), "pack_bits: bits: expected 1, 2, 3 or 4, got 5");
  EXPECT_ERROR(pack_bits(values, 3, packed), "pack_bits: packed: expected 12 bytes (ceil(31 values * 3 bits / 8)), got 11 bytes");
  EXPECT_ERROR(unpack_bits(packed, 0, values), "unpack_bits: bits: expected 1, 2, 3 or 4, got 0");
  std::vector<uint8_t> packed8(8);
  values[2] = 4;
  EXPECT_ERROR(pack_bits(values, 2, packed8), "pack_bits: values[2]: expected a value below 2^2 = 4, got 4");
  std::vector<float> x(9);
  EXPECT_ERROR(pack_signs(x, packed8), "pack_signs: packed: expected 2 bytes (ceil(9 values * 1 bits / 8)), got 8 bytes");
}

}  // namespace
}  // namespace decodelab::kvquant
