// The random stream behind every seeded piece of the KV codecs (the rotations' Gaussian matrix,
// signs and permutation; QJL's Gaussian sketch; RaBitQ's randomized rounding of queries).
// Internal to src/kvquant.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <random>

namespace decodelab::detail {

// std::mt19937_64 is specified bit for bit by the standard, but std::normal_distribution and
// std::uniform_int_distribution are not, so the draws are made here: a seed then means the same
// rotation or sketch with every standard library (Gaussian draws up to the last bit of libm's
// log and cos).
class SeededStream {
 public:
  explicit SeededStream(uint64_t seed) : engine_(seed) {}

  double sign() { return (engine_() >> 63) != 0 ? -1.0 : 1.0; }

  // Uniform in [0, n), without modulo bias: draws that fall in the incomplete last copy of
  // [0, n) within [0, 2^64) are redrawn.
  uint64_t below(uint64_t n) {
    const uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % n;
    uint64_t r = engine_();
    while (r >= limit) r = engine_();
    return r % n;
  }

  // Uniform in [0, 1), on the grid of 2^-53.
  double uniform() { return double(engine_() >> 11) * 0x1p-53; }

  // N(0, 1) by Box-Muller from two 53-bit uniforms, u1 in (0, 1] so that log(u1) is finite.
  double normal() {
    const double u1 = double((engine_() >> 11) + 1) * 0x1p-53;
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  }

 private:
  std::mt19937_64 engine_;
};

}  // namespace decodelab::detail
