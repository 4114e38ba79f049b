// Reading a matrix of vectors from a NumPy .npy file (numpy.save of a 2-D float32 or float16
// array), for `decodelab kv-eval --input FILE`.
//
// The format (numpy.lib.format, versions 1.0, 2.0 and 3.0):
//   bytes [0, 6)   the magic "\x93NUMPY"
//   bytes 6, 7     the major and minor version (1.0, 2.0 or 3.0)
//   then           the header length H, u16 little-endian (version 1) or u32 (versions 2, 3)
//   then           H bytes of header: a Python dict literal with exactly the keys 'descr',
//                  'fortran_order' and 'shape', e.g. "{'descr': '<f4', 'fortran_order': False,
//                  'shape': (10000, 128), }", padded with spaces and ending in '\n'
//   then           the data, rows * cols elements in C order.
// Accepted: descr '<f4' or '<f2' (little-endian float32, float16), fortran_order False, shape
// two positive sizes, and exactly rows * cols * itemsize bytes of data. Anything else is refused
// with an error that names the field, what was expected and what the file holds; nothing is
// guessed (a Fortran-order or big-endian file would otherwise read as the wrong numbers).
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string_view>
#include <vector>

namespace decodelab {

struct NpyMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> values;  // rows * cols, row-major; float16 files widened to f32
};

// `bytes` is the whole file; `source` names it in errors ("keys.npy").
NpyMatrix parse_npy(std::span<const uint8_t> bytes, std::string_view source);

// Reads and parses the file at `path`.
NpyMatrix read_npy(const std::filesystem::path& path);

}  // namespace decodelab
