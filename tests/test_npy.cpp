// The .npy reader: files built here byte by byte (so the reader is not checked against a writer
// of its own) round-trip in float32 and float16 with both header-length widths, and every
// malformed header, dtype, shape and data size is refused with an error naming what was expected.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <bit>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "decodelab/dtype.h"
#include "decodelab/npy.h"
#include "error_of.h"

namespace decodelab {
namespace {

// A .npy file: magic, version major.0, the header length (2 bytes for version 1, 4 otherwise),
// `dict` padded with spaces and a '\n' so that the data starts at a multiple of 64, then `data`.
std::vector<uint8_t> npy_file(std::string_view dict, int major, const std::vector<uint8_t>& data) {
  const size_t prefix = 8 + (major == 1 ? 2 : 4);
  std::string header(dict);
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::vector<uint8_t> file{0x93, 'N', 'U', 'M', 'P', 'Y', uint8_t(major), 0};
  for (size_t i = 0; i < prefix - 8; ++i) file.push_back(uint8_t(header.size() >> (8 * i)));
  file.insert(file.end(), header.begin(), header.end());
  file.insert(file.end(), data.begin(), data.end());
  return file;
}

// Little-endian bytes of each value, in f32 or f16.
std::vector<uint8_t> le_bytes(const std::vector<float>& values, bool half) {
  std::vector<uint8_t> bytes;
  for (float v : values) {
    const uint32_t bits = half ? f32_to_f16(v) : std::bit_cast<uint32_t>(v);
    for (int i = 0; i < (half ? 2 : 4); ++i) bytes.push_back(uint8_t(bits >> (8 * i)));
  }
  return bytes;
}

// 3 x 4 values exact in f16 too, with a negative, a fraction and a large one.
const std::vector<float> kValues{1.0f, -2.5f, 0.125f, 3.0f, 1024.0f, -0.0625f, 7.0f, 8.5f, -9.0f, 10.0f, 0.5f, -12.0f};

TEST(Npy, RoundTripsFloat32AndFloat16InBothHeaderVersions) {
  for (bool half : {false, true}) {
    for (int major : {1, 2, 3}) {
      SCOPED_TRACE(fmt::format("{} version {}", half ? "f2" : "f4", major));
      const std::string dict = fmt::format("{{'descr': '<{}', 'fortran_order': False, 'shape': (3, 4), }}", half ? "f2" : "f4");
      const NpyMatrix m = parse_npy(npy_file(dict, major, le_bytes(kValues, half)), "t.npy");
      EXPECT_EQ(m.rows, 3);
      EXPECT_EQ(m.cols, 4);
      EXPECT_EQ(m.values, kValues);
    }
  }
  // Spacing, key order, double quotes and no trailing commas are numpy's to choose: all accepted.
  const NpyMatrix m = parse_npy(npy_file(R"({"shape":(3,4),"fortran_order":False,"descr":"<f4"})", 1, le_bytes(kValues, false)), "t.npy");
  EXPECT_EQ(m.values, kValues);
}

TEST(Npy, ReadsAFileFromDisk) {
  const std::filesystem::path path = std::filesystem::temp_directory_path() / fmt::format("decodelab_npy_{}.npy", ::getpid());
  const std::vector<uint8_t> bytes = npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }", 1, le_bytes(kValues, false));
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  const NpyMatrix m = read_npy(path);
  std::filesystem::remove(path);
  EXPECT_EQ(m.values, kValues);
  EXPECT_ERROR(read_npy(path), fmt::format("read_npy: {}: expected a readable file, got it cannot be opened", path.string()));
}

// The error that a file with header `dict` (version 1) and the 48 bytes of kValues in f4 gets.
std::string error_for_header(std::string_view dict) {
  return error_of([&] { parse_npy(npy_file(dict, 1, le_bytes(kValues, false)), "t.npy"); });
}

TEST(Npy, RefusesBadDtypesOrdersAndShapes) {
  EXPECT_EQ(error_for_header("{'descr': '>f4', 'fortran_order': False, 'shape': (3, 4), }"),
            "t.npy: descr: expected '<f4' or '<f2' (little-endian float32 or float16), got '>f4'");
  EXPECT_EQ(error_for_header("{'descr': '<f8', 'fortran_order': False, 'shape': (3, 2), }"),
            "t.npy: descr: expected '<f4' or '<f2' (little-endian float32 or float16), got '<f8'");
  EXPECT_EQ(error_for_header("{'descr': '<f4', 'fortran_order': True, 'shape': (3, 4), }"),
            "t.npy: fortran_order: expected False (C order), got True");
  EXPECT_EQ(error_for_header("{'descr': '<f4', 'fortran_order': False, 'shape': (12,), }"),
            "t.npy: shape: expected two positive sizes (rows, cols), got (12)");
  EXPECT_EQ(error_for_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 4), }"),
            "t.npy: shape: expected two positive sizes (rows, cols), got (1, 3, 4)");
  EXPECT_EQ(error_for_header("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4), }"),
            "t.npy: shape: expected two positive sizes (rows, cols), got (0, 4)");
  EXPECT_EQ(error_for_header("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 4), }"),
            "t.npy: data: expected 4 x 4 x 4 bytes after the header, got 48 bytes");
  // A shape whose byte count overflows 64 bits is a size mismatch, not a wrapped product.
  EXPECT_EQ(error_for_header("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }"),
            "t.npy: data: expected 4611686018427387904 x 4 x 4 bytes after the header, got 48 bytes");
}

TEST(Npy, RefusesMalformedHeaders) {
  EXPECT_EQ(error_for_header("{'descr': '<f4', 'shape': (3, 4), }"),
            "t.npy: fortran_order: expected a value, got none (the key is missing from the header)");
  EXPECT_EQ(error_for_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), 'extra': 1}"),
            "t.npy: header: expected each of the keys 'descr', 'fortran_order' and 'shape' once, got the key 'extra'");
  EXPECT_EQ(error_for_header("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (3, 4)}"),
            "t.npy: header: expected each of the keys 'descr', 'fortran_order' and 'shape' once, got 'descr' twice");
  EXPECT_EQ(error_for_header("['descr', '<f4']"), "t.npy: header: expected a dict starting with '{', got '['descr', '<f4']' at byte 0");
  EXPECT_EQ(error_for_header("{'descr': '<f4', 'fortran_order': false, 'shape': (3, 4)}"),
            "t.npy: header: expected True or False, got 'false, 'shape': (3, 4)}' at byte 34");
  EXPECT_EQ(error_for_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3, -4)}"),
            "t.npy: header: expected a tuple of sizes, e.g. (10000, 128), got '-4)}' at byte 54");
  EXPECT_EQ(error_for_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3 4)}"),
            "t.npy: header: expected a tuple of sizes, e.g. (10000, 128), got '4)}' at byte 53");
  EXPECT_EQ(error_for_header("{'descr': '<f4' 'fortran_order': False, 'shape': (3, 4)}"),
            "t.npy: header: expected ',' or '}' after a value, got ''fortran_order': False,' at byte 16");
  EXPECT_EQ(error_for_header("{'descr: '<f4', 'fortran_order': False, 'shape': (3, 4)}"),
            "t.npy: header: expected ':' after the key, got '<f4', 'fortran_order': F' at byte 10");
  EXPECT_EQ(error_for_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4)} x"),
            "t.npy: header: expected spaces and one '\\n' after the dict, got ' x' at byte 57");
  // A header without its '\n': the dict is followed by the end of the header.
  std::vector<uint8_t> no_newline = npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4)}", 1, le_bytes(kValues, false));
  no_newline[10 + 117] = ' ';  // the header is 118 bytes, '\n' the last of them
  EXPECT_ERROR(parse_npy(no_newline, "t.npy"),
               "t.npy: header: expected spaces and one '\\n' after the dict, got only spaces from byte 57 to the end of the header");
}

TEST(Npy, RefusesBadMagicVersionAndLengths) {
  const std::vector<uint8_t> good = npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }", 1, le_bytes(kValues, false));
  EXPECT_ERROR(parse_npy({}, "t.npy"), "t.npy: magic: expected a .npy file starting with \\x93NUMPY, got 0 bytes starting ");
  std::vector<uint8_t> bad = good;
  bad[1] = 'n';
  EXPECT_ERROR(parse_npy(bad, "t.npy"), "t.npy: magic: expected a .npy file starting with \\x93NUMPY, got 176 bytes starting 93 6e 55 4d 50 59");
  bad = good;
  bad[6] = 4;
  EXPECT_ERROR(parse_npy(bad, "t.npy"), "t.npy: version: expected 1.0, 2.0 or 3.0, got 4.0");
  bad = good;
  bad[7] = 1;
  EXPECT_ERROR(parse_npy(bad, "t.npy"), "t.npy: version: expected 1.0, 2.0 or 3.0, got 1.1");
  EXPECT_ERROR(parse_npy(std::span(good).first(9), "t.npy"), "t.npy: header length: expected 2 bytes after the version, got a file of 9 bytes");
  bad = good;
  bad[9] = 0x10;  // 4096 + 118 header bytes in a 176-byte file
  EXPECT_ERROR(parse_npy(bad, "t.npy"), "t.npy: header length: expected at most 166 bytes (the rest of the file), got 4214");
  // One data byte short.
  EXPECT_ERROR(parse_npy(std::span(good).first(good.size() - 1), "t.npy"),
               "t.npy: data: expected 3 x 4 x 4 bytes after the header, got 47 bytes");
}

}  // namespace
}  // namespace decodelab
