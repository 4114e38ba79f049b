// Element types and the f16/bf16 <-> f32 conversions every backend shares.
//
// f16 and bf16 are stored as raw 16-bit patterns (uint16_t) and widened to f32 for arithmetic.
// Narrowing rounds to nearest, ties to even (IEEE 754 default), keeps signed zeros and
// infinities, and turns NaN into a quiet NaN of the same sign.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace decodelab {

// f64 exists for the reference oracle only: public ops reject it.
enum class DType : uint8_t { f32, f16, bf16, f64, i32, u32, u8 };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::f64: return 8;
    case DType::i32: return 4;
    case DType::u32: return 4;
    case DType::u8: return 1;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::f64: return "f64";
    case DType::i32: return "i32";
    case DType::u32: return "u32";
    case DType::u8: return "u8";
  }
  return "?";
}

constexpr bool is_float_activation(DType t) {
  return t == DType::f32 || t == DType::f16 || t == DType::bf16;
}

// Parses "f32", "f16", "bf16"; throws decodelab::Error naming `what` otherwise.
DType parse_activation_dtype(std::string_view name, std::string_view what);

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1F) {  // inf or NaN: keep the payload
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal: rebias 15 -> 127
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal f16 is a normal f32: shift the leading one into place
    int e = -1;
    do {
      mantissa <<= 1;
      ++e;
    } while ((mantissa & 0x400u) == 0);
    bits = sign | uint32_t(112 - e) << 23 | ((mantissa & 0x3FFu) << 13);
  }
  return std::bit_cast<float>(bits);
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((abs >> 13) & 0x1FFu));  // quiet NaN
  if (abs >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds past 65504: inf
  if (abs >= 0x38800000u) {  // normal f16 range (>= 2^-14)
    // Rebias and round the 13 dropped bits to nearest even; a carry into the exponent is correct.
    const uint32_t rounded = abs + 0xFFFu + ((abs >> 13) & 1u);
    return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
  }
  if (abs < 0x33000000u) return sign;  // below half the smallest subnormal (2^-25): zero
  // Subnormal f16: value = m * 2^-24 with m = round(mantissa_with_hidden_bit >> shift).
  const uint32_t exponent = abs >> 23;
  const uint32_t mantissa = (abs & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126 - exponent;  // 14..24
  const uint32_t half = 1u << (shift - 1);
  const uint32_t rest = mantissa & ((1u << shift) - 1);
  uint32_t m = mantissa >> shift;
  if (rest > half || (rest == half && (m & 1u))) ++m;
  return uint16_t(sign | m);
}

inline float bf16_to_f32(uint16_t b) { return std::bit_cast<float>(uint32_t(b) << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((bits >> 16) | 0x40u);  // quiet NaN
  return uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace decodelab
