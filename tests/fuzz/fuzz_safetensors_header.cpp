// libFuzzer target for the parsers of untrusted checkpoint files. Each input is tried three ways:
//   1. as a whole safetensors file (parse_safetensors_header);
//   2. as a header behind a correct length prefix: byte 0 is the size of the data section (filled
//      with a fixed pattern), the rest is the header text, so that mutations spend their time in
//      the JSON and tensor-entry checks rather than in the length prefix;
//   3. as config.json text (parse_model_config).
// A decodelab::Error is the only acceptable failure: any other exception escapes and libFuzzer
// reports it, as it reports crashes, leaks and (with -fsanitize=undefined) undefined behavior.
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

#include "decodelab/checkpoint.h"
#include "decodelab/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace decodelab;
  try {
    parse_safetensors_header(std::span(data, size), "fuzz");
  } catch (const Error&) {
  }
  if (size > 0) {
    const size_t header_bytes = size - 1, data_bytes = data[0];
    std::vector<uint8_t> file(8 + header_bytes + data_bytes, 0xA5);
    const uint64_t prefix = header_bytes;
    std::memcpy(file.data(), &prefix, 8);
    std::memcpy(file.data() + 8, data + 1, header_bytes);
    try {
      parse_safetensors_header(file, "fuzz");
    } catch (const Error&) {
    }
  }
  try {
    parse_model_config(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
  } catch (const Error&) {
  }
  return 0;
}
