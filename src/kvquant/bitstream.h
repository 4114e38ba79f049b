// The little-endian bit stream that every packed index in src/kvquant uses: value j of b-bit
// values occupies stream bits [j*b, (j+1)*b), least significant bit first, and stream bit k is
// bit k % 8 of byte k / 8 (kvquant.h's bit packing; product_vq.h's codes, up to 16 bits).
// Internal to src/kvquant.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace decodelab::detail {

inline constexpr int kMaxStreamBits = 16;

// ORs value j (bits in 1..16, value < 2^bits) into the stream: a value may cover up to three bytes
// (a 16-bit value starting at bit 7 of a byte).
inline void put_stream_bits(std::span<uint8_t> stream, size_t j, int bits, unsigned value) {
  const size_t first_bit = j * size_t(bits);
  size_t byte = first_bit / 8;
  const unsigned shift = unsigned(first_bit % 8);
  uint32_t window = uint32_t(value) << shift;
  for (unsigned covered = 0; covered < shift + unsigned(bits); covered += 8, ++byte, window >>= 8) {
    stream[byte] = uint8_t(stream[byte] | uint8_t(window));
  }
}

inline unsigned get_stream_bits(std::span<const uint8_t> stream, size_t j, int bits) {
  const size_t first_bit = j * size_t(bits);
  const size_t byte = first_bit / 8;
  const unsigned shift = unsigned(first_bit % 8);
  uint32_t window = 0;
  for (unsigned covered = 0; covered < shift + unsigned(bits); covered += 8) {
    window |= uint32_t(stream[byte + covered / 8]) << covered;
  }
  return unsigned(window >> shift) & ((1u << bits) - 1u);
}

}  // namespace decodelab::detail
