// Seeded random inputs at realistic scales. Never zeros: a case whose reference output is mostly
// zero is refused by the harness as unable to catch anything.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "decodelab/tensor.h"

namespace decodelab::verify {

class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}
  double normal() { return normal_(engine_); }
  int64_t uniform_int(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(engine_); }
  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
  std::normal_distribution<double> normal_{0.0, 1.0};
};

// Fills a float tensor (f32, f16, bf16 or f64, host memory) with mean + stddev * N(0, 1).
void fill_normal(const Tensor& t, Rng& rng, double stddev = 1.0, double mean = 0.0);

// Fills every element of a float tensor with one value.
void fill_value(const Tensor& t, double value);

// An array of `shape` in `dtype` filled with mean + stddev * N(0, 1).
Array random_array(DType dtype, const std::vector<int64_t>& shape, Rng& rng, double stddev = 1.0,
                   double mean = 0.0);

// An i32 array from explicit values.
Array i32_array(std::initializer_list<int64_t> shape, const std::vector<int32_t>& values);

// KV caches for cases: tokens below each length random, every other slot NaN, so that a kernel
// reading past a length or writing where it should not is caught.
struct KVFixture {
  Array k, v;        // contiguous [B, Hkv, S_max, D] or paged pools [num_pages, page_size, Hkv, D]
  Array page_table;  // paged only: [B, max_pages] i32, pages handed out in a shuffled order
  Array lengths;     // [B] i32
};
KVFixture contiguous_fixture(DType dtype, const std::vector<int32_t>& lengths, int64_t hkv, int64_t s_max,
                             int64_t d, Rng& rng);
KVFixture paged_fixture(DType dtype, const std::vector<int32_t>& lengths, int64_t capacity, int64_t page_size,
                        int64_t hkv, int64_t d, Rng& rng);

}  // namespace decodelab::verify
