// Statistics shared by the KV codecs' estimator tests (QJL, RaBitQ): inner products in double,
// the regression slope of estimates on the truth, and means with standard errors clustered over
// the pairs that share one random sketch or rotation.
#pragma once

#include <cmath>
#include <span>
#include <vector>

namespace decodelab::kvquant {

inline double dot(std::span<const float> a, std::span<const float> b) {
  double sum = 0.0;
  for (size_t j = 0; j < a.size(); ++j) sum += double(a[j]) * double(b[j]);
  return sum;
}

// The least-squares slope of estimate on truth: 1 for an unbiased estimator, whatever its noise.
inline double regression_slope(const std::vector<double>& truth, const std::vector<double>& estimate) {
  const size_t n = truth.size();
  double mt = 0.0, me = 0.0;
  for (size_t i = 0; i < n; ++i) {
    mt += truth[i] / double(n);
    me += estimate[i] / double(n);
  }
  double stt = 0.0, ste = 0.0;
  for (size_t i = 0; i < n; ++i) {
    stt += (truth[i] - mt) * (truth[i] - mt);
    ste += (truth[i] - mt) * (estimate[i] - me);
  }
  return ste / stt;
}

// Mean of x and its standard error from the means of consecutive groups of `group` (the pairs
// that share a sketch or rotation, whose errors may correlate through it).
struct MeanAndError {
  double mean = 0.0, standard_error = 0.0;
};
inline MeanAndError clustered_mean(const std::vector<double>& x, size_t group) {
  const size_t groups = x.size() / group;
  std::vector<double> means(groups, 0.0);
  for (size_t i = 0; i < groups * group; ++i) means[i / group] += x[i] / double(group);
  double mean = 0.0;
  for (double v : means) mean += v / double(groups);
  double var = 0.0;
  for (double v : means) var += (v - mean) * (v - mean) / double(groups - 1);
  return {mean, std::sqrt(var / double(groups))};
}

}  // namespace decodelab::kvquant
