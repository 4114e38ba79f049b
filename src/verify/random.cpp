#include "verify/random.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "decodelab/error.h"
#include "reference/elements.h"

namespace decodelab::verify {

void fill_normal(const Tensor& t, Rng& rng, double stddev, double mean) {
  for (int64_t i = 0; i < t.numel(); ++i) reference::store(t, i, mean + stddev * rng.normal());
}

void fill_value(const Tensor& t, double value) {
  for (int64_t i = 0; i < t.numel(); ++i) reference::store(t, i, value);
}

Array random_array(DType dtype, const std::vector<int64_t>& shape, Rng& rng, double stddev, double mean) {
  Array a(dtype, std::span<const int64_t>(shape));
  fill_normal(a, rng, stddev, mean);
  return a;
}

Array i32_array(std::initializer_list<int64_t> shape, const std::vector<int32_t>& values) {
  Array a(DType::i32, shape);
  if (size_t(a.numel()) != values.size()) fail("i32_array", "values", std::to_string(a.numel()), std::to_string(values.size()));
  std::copy(values.begin(), values.end(), a.ptr<int32_t>());
  return a;
}

KVFixture contiguous_fixture(DType dtype, const std::vector<int32_t>& lengths, int64_t hkv, int64_t s_max,
                             int64_t d, Rng& rng) {
  const int64_t batch = int64_t(lengths.size());
  KVFixture f{Array(dtype, {batch, hkv, s_max, d}), Array(dtype, {batch, hkv, s_max, d}), Array(),
              i32_array({batch}, lengths)};
  for (const Array* a : {&f.k, &f.v}) {
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t h = 0; h < hkv; ++h) {
        for (int64_t t = 0; t < s_max; ++t) {
          for (int64_t i = 0; i < d; ++i) {
            reference::store(*a, ((b * hkv + h) * s_max + t) * d + i, t < lengths[size_t(b)] ? rng.normal() : std::nan(""));
          }
        }
      }
    }
  }
  return f;
}

KVFixture paged_fixture(DType dtype, const std::vector<int32_t>& lengths, int64_t capacity, int64_t page_size,
                        int64_t hkv, int64_t d, Rng& rng) {
  const int64_t batch = int64_t(lengths.size());
  const int64_t max_pages = (capacity + page_size - 1) / page_size;
  const int64_t num_pages = batch * max_pages + 3;  // a few pages nobody owns
  std::vector<int32_t> order(static_cast<size_t>(num_pages));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng.engine());
  order.resize(size_t(batch * max_pages));
  KVFixture f{Array(dtype, {num_pages, page_size, hkv, d}), Array(dtype, {num_pages, page_size, hkv, d}),
              i32_array({batch, max_pages}, order), i32_array({batch}, lengths)};
  for (const Array* a : {&f.k, &f.v}) {
    fill_value(*a, std::nan(""));
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t t = 0; t < lengths[size_t(b)]; ++t) {
        const int64_t page = order[size_t(b * max_pages + t / page_size)];
        for (int64_t i = 0; i < hkv * d; ++i) reference::store(*a, (page * page_size + t % page_size) * hkv * d + i, rng.normal());
      }
    }
  }
  return f;
}

}  // namespace decodelab::verify
