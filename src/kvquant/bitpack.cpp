// Bit packing of 1-4-bit values and sign bits into a little-endian bit stream (layout in
// include/decodelab/kvquant.h): value j in stream bits [j*b, (j+1)*b), stream bit k in bit k % 8
// of byte k / 8.
#include <fmt/format.h>

#include <algorithm>
#include <string>

#include "decodelab/error.h"
#include "decodelab/kvquant.h"
#include "kvquant/bitstream.h"

namespace decodelab::kvquant {
namespace {

using detail::get_stream_bits;
using detail::put_stream_bits;

void check_bits(std::string_view op, int bits) {
  if (bits < 1 || bits > 4) fail(op, "bits", "1, 2, 3 or 4", std::to_string(bits));
}

void check_packed_size(std::string_view op, size_t packed_size, size_t count, int bits) {
  const int64_t want = packed_bytes(int64_t(count), bits);
  if (int64_t(packed_size) != want) {
    fail(op, "packed", fmt::format("{} bytes (ceil({} values * {} bits / 8))", want, count, bits),
         fmt::format("{} bytes", packed_size));
  }
}

}  // namespace

int64_t packed_bytes(int64_t count, int bits) {
  check_bits("packed_bytes", bits);
  if (count < 0) fail("packed_bytes", "count", "count >= 0", std::to_string(count));
  return (count * bits + 7) / 8;
}

void pack_bits(std::span<const uint8_t> values, int bits, std::span<uint8_t> packed) {
  check_bits("pack_bits", bits);
  check_packed_size("pack_bits", packed.size(), values.size(), bits);
  for (size_t j = 0; j < values.size(); ++j) {
    if (values[j] >> bits) {
      fail("pack_bits", fmt::format("values[{}]", j), fmt::format("a value below 2^{} = {}", bits, 1 << bits),
           std::to_string(values[j]));
    }
  }
  std::fill(packed.begin(), packed.end(), uint8_t{0});  // put_stream_bits ORs into the bytes
  for (size_t j = 0; j < values.size(); ++j) put_stream_bits(packed, j, bits, values[j]);
}

void unpack_bits(std::span<const uint8_t> packed, int bits, std::span<uint8_t> values) {
  check_bits("unpack_bits", bits);
  check_packed_size("unpack_bits", packed.size(), values.size(), bits);
  for (size_t j = 0; j < values.size(); ++j) values[j] = uint8_t(get_stream_bits(packed, j, bits));
}

void pack_signs(std::span<const float> x, std::span<uint8_t> packed) {
  check_packed_size("pack_signs", packed.size(), x.size(), 1);
  std::fill(packed.begin(), packed.end(), uint8_t{0});
  for (size_t j = 0; j < x.size(); ++j) put_stream_bits(packed, j, 1, x[j] < 0.0f ? 1u : 0u);
}

void unpack_signs(std::span<const uint8_t> packed, std::span<float> signs) {
  check_packed_size("unpack_signs", packed.size(), signs.size(), 1);
  for (size_t j = 0; j < signs.size(); ++j) signs[j] = get_stream_bits(packed, j, 1) ? -1.0f : 1.0f;
}

}  // namespace decodelab::kvquant
