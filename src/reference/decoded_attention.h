// Plain attention of one KV head's query heads over its decoded keys and values, in double: the
// second half of the reference for every compressed cache, whose first half decodes the records
// with the codec (or, for RaBitQ keys, scores them with the codec's estimator).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "reference/elements.h"

namespace decodelab::reference {

// The softmax of the (scaled) scores of `length` tokens, over their values [length, D], into
// out[at, at + D).
inline void attend_scores(const Tensor& out, int64_t at, const std::vector<double>& scores,
                          const std::vector<double>& values, int64_t length) {
  const int64_t d = out.dim(out.rank - 1);
  const double max_score = *std::max_element(scores.begin(), scores.end());
  double denominator = 0.0;
  std::vector<double> acc(static_cast<size_t>(d), 0.0);
  for (int64_t t = 0; t < length; ++t) {
    const double p = std::exp(scores[size_t(t)] - max_score);
    denominator += p;
    for (int64_t c = 0; c < d; ++c) acc[size_t(c)] += p * values[size_t(t * d + c)];
  }
  for (int64_t c = 0; c < d; ++c) store(out, at + c, acc[size_t(c)] / denominator);
}

// q, out = [B, Hq, D]; the `group` query heads of KV head h of sequence b (heads h * group ..)
// attend over keys and values [length, D].
inline void attend_decoded(const Tensor& q, const Tensor& out, int64_t b, int64_t h, int64_t group, double scale,
                           const std::vector<double>& keys, const std::vector<double>& values, int64_t length) {
  const int64_t hq = q.dim(1), d = q.dim(2);
  std::vector<double> scores(static_cast<size_t>(length));
  for (int64_t g = 0; g < group; ++g) {
    const int64_t q_at = (b * hq + h * group + g) * d;
    for (int64_t t = 0; t < length; ++t) {
      double dot = 0.0;
      for (int64_t c = 0; c < d; ++c) dot += load(q, q_at + c) * keys[size_t(t * d + c)];
      scores[size_t(t)] = dot * scale;
    }
    attend_scores(out, q_at, scores, values, length);
  }
}

}  // namespace decodelab::reference
