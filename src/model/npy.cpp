// The .npy reader (format and what is accepted in include/decodelab/npy.h). The header is a Python
// dict literal, not JSON, so it is read by a small recursive-descent reader over exactly the
// grammar numpy.save writes: quoted strings, True/False, and tuples of non-negative integers.
#include "decodelab/npy.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <string>

#include "decodelab/dtype.h"
#include "decodelab/error.h"

namespace decodelab {
namespace {

constexpr std::string_view kMagic = "\x93NUMPY";

// A cursor over the header text; every failure names the header and shows where it stopped.
class HeaderReader {
 public:
  HeaderReader(std::string_view text, std::string_view source) : text_(text), source_(source) {}

  // Shows up to 24 characters from where reading stopped, '\n' escaped and the space padding
  // trimmed.
  [[noreturn]] void fail_here(std::string_view expected) const {
    std::string rest;
    for (char c : text_.substr(pos_, 24)) rest += c == '\n' ? std::string("\\n") : std::string(1, c);
    rest.erase(rest.find_last_not_of(' ') + 1);
    fail(source_, "header", expected,
         !rest.empty() ? fmt::format("'{}' at byte {}", rest, pos_)
         : pos_ == text_.size() ? std::string("the end of the header")
                                : fmt::format("only spaces from byte {} to the end of the header", pos_));
  }

  void skip_spaces() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t')) ++pos_;
  }

  // The next character after spaces is `c`: consumes it.
  bool accept(char c) {
    skip_spaces();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  void expect(char c, std::string_view what) {
    if (!accept(c)) fail_here(what);
  }

  // 'text' or "text"; numpy's keys and descr need no escapes, so a backslash is refused.
  std::string quoted(std::string_view what) {
    skip_spaces();
    if (pos_ >= text_.size() || (text_[pos_] != '\'' && text_[pos_] != '"')) fail_here(what);
    const char quote = text_[pos_];
    const size_t end = text_.find(quote, pos_ + 1);
    const size_t escape = text_.find('\\', pos_ + 1);
    if (end == std::string_view::npos || escape < end) fail_here(fmt::format("{} (a string without escapes)", what));
    std::string s(text_.substr(pos_ + 1, end - pos_ - 1));
    pos_ = end + 1;
    return s;
  }

  bool boolean(std::string_view what) {
    skip_spaces();
    for (const auto& [word, value] : {std::pair{std::string_view("True"), true}, std::pair{std::string_view("False"), false}}) {
      if (text_.substr(pos_, word.size()) == word) {
        pos_ += word.size();
        return value;
      }
    }
    fail_here(what);
  }

  // (a, b, ...), with numpy's trailing comma allowed: "(10000, 128)", "(3,)", "()".
  std::vector<int64_t> tuple(std::string_view what) {
    expect('(', what);
    std::vector<int64_t> sizes;
    while (!accept(')')) {
      sizes.push_back(size(what));
      if (!accept(',')) {
        expect(')', what);
        break;
      }
    }
    return sizes;
  }

  bool at_end_of_dict_padding() const {
    // After the dict numpy writes spaces and one '\n'.
    const size_t rest = text_.find_first_not_of(' ', pos_);
    return rest != std::string_view::npos && rest + 1 == text_.size() && text_[rest] == '\n';
  }

 private:
  int64_t size(std::string_view what) {
    skip_spaces();
    const size_t start = pos_;
    int64_t value = 0;
    while (pos_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[pos_]))) {
      const int digit = text_[pos_] - '0';
      if (value > (std::numeric_limits<int64_t>::max() - digit) / 10) {
        pos_ = start;
        fail_here(fmt::format("{} (sizes below 2^63)", what));
      }
      value = value * 10 + digit;
      ++pos_;
    }
    if (pos_ == start) fail_here(what);
    return value;
  }

  std::string_view text_;
  std::string_view source_;
  size_t pos_ = 0;
};

struct Header {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
};

constexpr std::string_view kShapeWhat = "a tuple of sizes, e.g. (10000, 128)";

Header parse_header(std::string_view text, std::string_view source) {
  HeaderReader reader(text, source);
  std::optional<std::string> descr;
  std::optional<bool> fortran_order;
  std::optional<std::vector<int64_t>> shape;
  reader.expect('{', "a dict starting with '{'");
  while (!reader.accept('}')) {
    const std::string key = reader.quoted("a quoted key ('descr', 'fortran_order' or 'shape') or '}'");
    reader.expect(':', "':' after the key");
    if (key == "descr" && !descr) {
      descr = reader.quoted("a quoted dtype, e.g. '<f4'");
    } else if (key == "fortran_order" && !fortran_order) {
      fortran_order = reader.boolean("True or False");
    } else if (key == "shape" && !shape) {
      shape = reader.tuple(kShapeWhat);
    } else {
      const bool known = key == "descr" || key == "fortran_order" || key == "shape";
      fail(source, "header", "each of the keys 'descr', 'fortran_order' and 'shape' once",
           known ? fmt::format("'{}' twice", key) : fmt::format("the key '{}'", key));
    }
    if (!reader.accept(',')) {
      reader.expect('}', "',' or '}' after a value");
      break;
    }
  }
  if (!reader.at_end_of_dict_padding()) reader.fail_here("spaces and one '\\n' after the dict");
  for (const auto& [present, key] : {std::pair{descr.has_value(), "descr"}, std::pair{fortran_order.has_value(), "fortran_order"},
                                     std::pair{shape.has_value(), "shape"}}) {
    if (!present) fail(source, key, "a value", "none (the key is missing from the header)");
  }
  return Header{*descr, *fortran_order, *shape};
}

uint32_t load_le(std::span<const uint8_t> bytes) {
  uint32_t value = 0;
  for (size_t i = 0; i < bytes.size(); ++i) value |= uint32_t(bytes[i]) << (8 * i);
  return value;
}

}  // namespace

NpyMatrix parse_npy(std::span<const uint8_t> bytes, std::string_view source) {
  const std::string_view file(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  if (file.substr(0, kMagic.size()) != kMagic) {
    fail(source, "magic", "a .npy file starting with \\x93NUMPY",
         fmt::format("{} bytes starting {:02x}", bytes.size(), fmt::join(bytes.first(std::min<size_t>(bytes.size(), 6)), " ")));
  }
  if (bytes.size() < 8) fail(source, "version", "two version bytes after the magic", fmt::format("a file of {} bytes", bytes.size()));
  const int major = bytes[6], minor = bytes[7];
  if ((major != 1 && major != 2 && major != 3) || minor != 0) {
    fail(source, "version", "1.0, 2.0 or 3.0", fmt::format("{}.{}", major, minor));
  }
  // Version 1 has a 2-byte header length, versions 2 and 3 a 4-byte one.
  const size_t length_bytes = major == 1 ? 2 : 4;
  if (bytes.size() < 8 + length_bytes) {
    fail(source, "header length", fmt::format("{} bytes after the version", length_bytes), fmt::format("a file of {} bytes", bytes.size()));
  }
  const size_t header_bytes = load_le(bytes.subspan(8, length_bytes));
  const size_t data_offset = 8 + length_bytes + header_bytes;
  if (data_offset > bytes.size()) {
    fail(source, "header length", fmt::format("at most {} bytes (the rest of the file)", bytes.size() - 8 - length_bytes),
         std::to_string(header_bytes));
  }
  const Header h = parse_header(file.substr(8 + length_bytes, header_bytes), source);

  size_t itemsize = 0;
  if (h.descr == "<f4") itemsize = 4;
  if (h.descr == "<f2") itemsize = 2;
  if (itemsize == 0) fail(source, "descr", "'<f4' or '<f2' (little-endian float32 or float16)", fmt::format("'{}'", h.descr));
  if (h.fortran_order) fail(source, "fortran_order", "False (C order)", "True");
  if (h.shape.size() != 2 || h.shape[0] == 0 || h.shape[1] == 0) {
    fail(source, "shape", "two positive sizes (rows, cols)", fmt::format("({})", fmt::join(h.shape, ", ")));
  }
  const int64_t rows = h.shape[0], cols = h.shape[1];
  const size_t data_bytes = bytes.size() - data_offset;
  // Each size is below 2^63; their product overflows only if it exceeds the data, checked first.
  if (uint64_t(rows) > data_bytes / itemsize / uint64_t(cols) || uint64_t(rows) * uint64_t(cols) * itemsize != data_bytes) {
    fail(source, "data", fmt::format("{} x {} x {} bytes after the header", rows, cols, itemsize), fmt::format("{} bytes", data_bytes));
  }

  NpyMatrix m{rows, cols, std::vector<float>(size_t(rows * cols))};
  const uint8_t* data = bytes.data() + data_offset;
  for (size_t i = 0; i < m.values.size(); ++i) {
    const uint32_t bits = load_le({data + i * itemsize, itemsize});
    m.values[i] = itemsize == 4 ? std::bit_cast<float>(bits) : f16_to_f32(uint16_t(bits));
  }
  return m;
}

NpyMatrix read_npy(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("read_npy", path.string(), "a readable file", "it cannot be opened");
  const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return parse_npy(bytes, path.string());
}

}  // namespace decodelab
