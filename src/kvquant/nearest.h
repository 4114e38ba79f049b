// Nearest-codeword search shared by the k-means trainer and the VQ encoders (product_vq.cpp,
// commvq.cpp), so that training and encoding break ties the same way. Internal to src/kvquant.
#pragma once

#include <cstdint>
#include <limits>
#include <span>
#include <utility>

namespace decodelab::detail {

inline double squared_distance(const double* a, const double* b, int64_t dim) {
  double sum = 0.0;
  for (int64_t j = 0; j < dim; ++j) sum += (a[j] - b[j]) * (a[j] - b[j]);
  return sum;
}

// Index of the nearest of k centers (k x dim, row-major; the lower index on ties) and its squared
// distance.
template <typename Center>
std::pair<int64_t, double> nearest_center(const double* point, std::span<const Center> centers, int64_t k, int64_t dim) {
  int64_t best = 0;
  double best_distance = std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < k; ++c) {
    double dist = 0.0;
    for (int64_t j = 0; j < dim; ++j) {
      const double diff = point[j] - double(centers[size_t(c * dim + j)]);
      dist += diff * diff;
    }
    if (dist < best_distance) best = c, best_distance = dist;
  }
  return {best, best_distance};
}

}  // namespace decodelab::detail
