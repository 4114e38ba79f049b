// libFuzzer target for the product VQ codebook parser (product_vq.h): every input is parsed as a
// whole codebook file, then once more with its checksum recomputed, so that mutations get past the
// checksum into the value checks. A decodelab::Error is the only acceptable failure; a codebook
// that parses must also encode and decode a vector without fault.
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "decodelab/error.h"
#include "decodelab/product_vq.h"

namespace {

void parse_and_use(std::span<const uint8_t> bytes) {
  using namespace decodelab::kvquant;
  try {
    const ProductVqCodebook book = parse_product_vq(bytes, "fuzz");
    std::vector<float> x(size_t(book.config().head_dim), 0.5f);
    std::vector<uint8_t> record(size_t(book.record_bytes()));
    book.encode(x, record);
    book.decode(record, x);
  } catch (const decodelab::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  parse_and_use(std::span(data, size));
  if (size >= 8) {
    // The checksum is FNV-1a (64-bit) of every byte before it, little-endian.
    std::vector<uint8_t> sealed(data, data + size);
    uint64_t hash = 0xcbf29ce484222325ull;
    for (size_t i = 0; i + 8 < size; ++i) hash = (hash ^ sealed[i]) * 0x100000001b3ull;
    for (int i = 0; i < 8; ++i) sealed[size - 8 + size_t(i)] = uint8_t(hash >> (8 * i));
    parse_and_use(sealed);
  }
  return 0;
}
