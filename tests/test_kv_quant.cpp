// KV-cache quantization: bit-packing round trips and layout, orthogonality and randomness of the
// rotations.
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
// Rotations

double norm_of(std::span<const double> v) {
  double sum = 0.0;
  for (double x : v) sum += x * x;
  return std::sqrt(sum);
}

// The matrix of a rotation, column j = R e_j, row-major.
std::vector<double> matrix_of(const Rotation& r) {
  const size_t n = size_t(r.dim());
  std::vector<double> m(n * n), e(n), column(n);
  for (size_t j = 0; j < n; ++j) {
    std::fill(e.begin(), e.end(), 0.0);
    e[j] = 1.0;
    r.apply(e, column);
    for (size_t i = 0; i < n; ++i) m[i * n + j] = column[i];
  }
  return m;
}

TEST(KvRotation, OrthogonalAndInverse) {
  for (RotationKind kind : {RotationKind::dense, RotationKind::hadamard}) {
    for (int64_t d : {16, 48, 64, 96, 128, 256}) {
      SCOPED_TRACE(fmt::format("{} D = {}", rotation_kind_name(kind), d));
      const Rotation r = Rotation::make(kind, d, 42);
      ASSERT_EQ(r.dim(), d);
      // R^T R = I, entry by entry.
      const std::vector<double> m = matrix_of(r);
      const size_t n = size_t(d);
      double worst = 0.0;
      for (size_t i = 0; i < n; ++i) {
        for (size_t j = 0; j < n; ++j) {
          double dot = 0.0;
          for (size_t k = 0; k < n; ++k) dot += m[k * n + i] * m[k * n + j];
          worst = std::max(worst, std::fabs(dot - (i == j ? 1.0 : 0.0)));
        }
      }
      EXPECT_LT(worst, 1e-13);
      // On random vectors: the norm is kept, the inverse undoes the rotation, in place too.
      Rng rng(static_cast<uint64_t>(d));
      for (int t = 0; t < 20; ++t) {
        std::vector<double> x(n), y(n), back(n);
        for (double& v : x) v = rng.normal();
        r.apply(x, y);
        EXPECT_NEAR(norm_of(y), norm_of(x), 1e-14 * norm_of(x));
        r.apply_inverse(y, back);
        for (size_t i = 0; i < n; ++i) ASSERT_NEAR(back[i], x[i], 1e-14 * norm_of(x)) << i;
        std::vector<double> in_place = x;
        r.apply(in_place, in_place);
        for (size_t i = 0; i < n; ++i) ASSERT_EQ(in_place[i], y[i]);
        r.apply_inverse(in_place, in_place);
        for (size_t i = 0; i < n; ++i) ASSERT_EQ(in_place[i], back[i]);
      }
    }
  }
}

TEST(KvRotation, SeedDefinesTheRotation) {
  for (RotationKind kind : {RotationKind::dense, RotationKind::hadamard}) {
    const std::vector<double> a = matrix_of(Rotation::make(kind, 96, 7));
    EXPECT_EQ(a, matrix_of(Rotation::make(kind, 96, 7))) << rotation_kind_name(kind);
    EXPECT_NE(a, matrix_of(Rotation::make(kind, 96, 8))) << rotation_kind_name(kind);
  }
}

TEST(KvRotation, DenseIsHaar) {
  // Over many seeds, each entry of a Haar-random orthogonal matrix has mean 0 and mean square
  // 1/D (and E[q^4] = 3 / (D (D + 2)), which sets the standard error of the mean square). A
  // QR without the sign fix biases the diagonal (Householder QR makes Q_00 = -sign(g_00) |..|),
  // and a missing normalization breaks the mean square. 4000 seeds at D = 8; 5 standard errors.
  const int64_t d = 8;
  const int seeds = 4000;
  const size_t n = size_t(d);
  std::vector<double> sum(n * n, 0.0), sum2(n * n, 0.0);
  for (int s = 0; s < seeds; ++s) {
    const std::vector<double> m = matrix_of(Rotation::make(RotationKind::dense, d, uint64_t(s)));
    for (size_t i = 0; i < n * n; ++i) {
      sum[i] += m[i];
      sum2[i] += m[i] * m[i];
    }
  }
  const double var_entry = 1.0 / double(d);
  const double var_square = 3.0 / double(d * (d + 2)) - 1.0 / double(d * d);
  for (size_t i = 0; i < n * n; ++i) {
    EXPECT_LT(std::fabs(sum[i] / seeds), 5.0 * std::sqrt(var_entry / seeds)) << "entry " << i;
    EXPECT_LT(std::fabs(sum2[i] / seeds - 1.0 / double(d)), 5.0 * std::sqrt(var_square / seeds)) << "entry " << i;
  }
}

TEST(KvRotation, HadamardMixesAcrossBlocks) {
  // D = 96 is blocks of 64 and 32. Without the permutation between rounds a spike in one block
  // would never leave it; with it each block of R e_i receives energy, about its share of D.
  // Every entry of R is O(1/sqrt(D)): a spike is spread, not passed through.
  for (int64_t d : {64, 96, 128, 256}) {
    const Rotation r = Rotation::make(RotationKind::hadamard, d, 3);
    const std::vector<double> m = matrix_of(r);
    const size_t n = size_t(d);
    double largest = 0.0;
    for (double v : m) largest = std::max(largest, std::fabs(v));
    EXPECT_LT(largest * std::sqrt(double(d)), 6.0) << "D = " << d;
    if (d != 96) continue;
    for (size_t j = 0; j < n; ++j) {
      double first = 0.0, second = 0.0;  // energy of R e_j in the 64-block and the 32-block
      for (size_t i = 0; i < n; ++i) (i < 64 ? first : second) += m[i * n + j] * m[i * n + j];
      EXPECT_GT(first, 0.5 * 64.0 / 96.0) << "input " << j;
      EXPECT_GT(second, 0.5 * 32.0 / 96.0) << "input " << j;
    }
  }
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

TEST(KvErrors, Rotation) {
  EXPECT_ERROR(Rotation::make(RotationKind::hadamard, 72, 0),
               "rotation: dim: expected D a positive multiple of 16 for a hadamard rotation, got 72");
  EXPECT_ERROR(Rotation::make(RotationKind::dense, 1, 0), "rotation: dim: expected D in [2, 4096] for a dense rotation, got 1");
  const Rotation r = Rotation::make(RotationKind::hadamard, 64, 0);
  std::vector<double> x(64), y(63);
  EXPECT_ERROR(r.apply(x, y), "rotation.apply: y: expected 64 values (the rotation's D), got 63");
  EXPECT_ERROR(r.apply_inverse(y, x), "rotation.apply_inverse: y: expected 64 values (the rotation's D), got 63");
}

}  // namespace
}  // namespace decodelab::kvquant
