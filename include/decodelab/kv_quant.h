// KV-cache vector quantization, base layer: bit packing.
//
// - Bit packing of 1-4-bit indices and of sign bits.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace decodelab::kvquant {

// ---------------------------------------------------------------------------------------------
// Bit packing.
//
// Layout: a little-endian bit stream. Value j of n b-bit values occupies stream bits
// [j*b, (j+1)*b), least significant bit first, and stream bit k is bit (k % 8) of byte k / 8.
// So 2- and 4-bit values never straddle a byte, 3-bit values may (value 2 takes bits 6-7 of byte 0
// and bit 0 of byte 1). The stream is ceil(n*b / 8) bytes; the spare high bits of its last byte
// are written as zero and ignored when reading.

// Bytes that `count` values of `bits` bits (1..4) take: ceil(count * bits / 8).
int64_t packed_bytes(int64_t count, int bits);

// values[j] < 2^bits into `packed`, which must be exactly packed_bytes(values.size(), bits).
void pack_bits(std::span<const uint8_t> values, int bits, std::span<uint8_t> packed);
// The other way: `packed` must be exactly packed_bytes(values.size(), bits).
void unpack_bits(std::span<const uint8_t> packed, int bits, std::span<uint8_t> values);

// Sign bits use the 1-bit layout: bit j is 1 where x[j] < 0, so +0.0 and -0.0 both read as +1.
void pack_signs(std::span<const float> x, std::span<uint8_t> packed);
// signs[j] = +1.0f or -1.0f.
void unpack_signs(std::span<const uint8_t> packed, std::span<float> signs);

}  // namespace decodelab::kvquant
