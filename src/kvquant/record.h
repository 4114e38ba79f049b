// Pieces of the per-token records that every KV codec shares: the f32 norm at the head of a
// record, little-endian whatever the host, and the checks on the vector it is the norm of.
// Internal to src/kvquant.
#pragma once

#include <fmt/format.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>

#include "core/check.h"

namespace decodelab::detail {

inline constexpr int64_t kNormBytes = 4;

inline void store_f32_le(uint8_t* dst, float v) {
  const uint32_t bits = std::bit_cast<uint32_t>(v);
  for (int i = 0; i < 4; ++i) dst[i] = uint8_t(bits >> (8 * i));
}

inline float load_f32_le(const uint8_t* src) {
  uint32_t bits = 0;
  for (int i = 0; i < 4; ++i) bits |= uint32_t(src[i]) << (8 * i);
  return std::bit_cast<float>(bits);
}

// Every entry of x finite, or an error naming the first that is not ("x[5]").
inline void check_finite(const ArgCheck& check, std::span<const float> x, std::string_view name) {
  for (size_t j = 0; j < x.size(); ++j) {
    if (!std::isfinite(x[j])) check.fail(fmt::format("{}[{}]", name, j), "a finite value", fmt::format("{}", x[j]));
  }
}

// ||x - c|| in double (c empty: ||x||), refusing non-finite entries of x and a norm that would not
// fit the record's f32 (each entry finite does not make the norm so: 64 entries of 1e38 have norm
// 8e38). The difference is taken in double, so that x - c is not rounded to f32 first.
inline double checked_distance(const ArgCheck& check, std::span<const float> x, std::span<const float> c,
                               std::string_view name) {
  check_finite(check, x, name);
  double norm2 = 0.0;
  for (size_t j = 0; j < x.size(); ++j) {
    const double v = double(x[j]) - (c.empty() ? 0.0 : double(c[j]));
    norm2 += v * v;
  }
  const double norm = std::sqrt(norm2);
  if (!std::isfinite(float(norm))) check.fail(name, "a vector whose norm fits in f32", fmt::format("norm {:g}", norm));
  return norm;
}

// ||x||, checked as above.
inline double checked_norm(const ArgCheck& check, std::span<const float> x, std::string_view name) {
  return checked_distance(check, x, {}, name);
}

// No encoder writes a negative or non-finite norm, so a record holding one is corrupt.
inline bool is_valid_norm(float norm) { return std::isfinite(norm) && norm >= 0.0f; }

// `name` says which record ("record norm", "records[3] norm").
[[noreturn]] inline void fail_record_norm(const ArgCheck& check, std::string_view name, float norm) {
  check.fail(name, "a finite norm >= 0", fmt::format("{}", norm));
}

// The record of token t of sequence b, KV head h in `pool` of a paged cache has a corrupt norm:
// the error says where it is.
[[noreturn]] inline void fail_paged_record_norm(const ArgCheck& check, std::string_view pool, int64_t b, int64_t t,
                                                int64_t h, float norm) {
  fail_record_norm(check, fmt::format("{}[sequence {}, token {}, KV head {}] norm", pool, b, t, h), norm);
}

// The norm at the head of a record, checked.
inline float checked_record_norm(const ArgCheck& check, const uint8_t* record, std::string_view name) {
  const float norm = load_f32_le(record);
  if (!is_valid_norm(norm)) fail_record_norm(check, name, norm);
  return norm;
}

}  // namespace decodelab::detail
