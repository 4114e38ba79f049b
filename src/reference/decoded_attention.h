// Plain attention of one KV head's query heads over its decoded keys and values, in double: the
// second half of the reference for every compressed cache, whose first half decodes the records
// with the codec (or, for RaBitQ and QJL keys, scores them with the codec's estimator).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "reference/elements.h"
#include "reference/kv_layout.h"

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

// Decode attention over a paged cache (rabitq_cache.h, qjl_cache.h) whose keys are scored by
// their codec's estimator and whose values are TurboQuant records decoded: every record of a KV
// head checked first, key before value, in token order (check_key(record, b, t, h) fails on a
// corrupt key record), the head's key records gathered back to back, then per query head
// score_keys(query, records, scores) puts the estimates of <q, k_t> (length of them) in `scores`
// and plain attention runs over them in double.
template <class Args, class CheckKey, class ScoreKeys>
void estimated_key_attention(const Args& a, const CheckKey& check_key, const ScoreKeys& score_keys) {
  const PagedRecordLayout at(a.cache);
  const int64_t batch = a.q.dim(0), hq = a.q.dim(1), d = a.q.dim(2), hkv = at.heads();
  const int64_t group = hq / hkv, key_bytes = a.cache.k_pages.dim(3);
  std::vector<float> decoded(static_cast<size_t>(d)), query(static_cast<size_t>(d));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = at.length(b);
    for (int64_t h = 0; h < hkv; ++h) {
      // The head's key records [length, R] and decoded values [length, d].
      std::vector<uint8_t> keys(size_t(length * key_bytes));
      std::vector<double> values(size_t(length * d));
      for (int64_t t = 0; t < length; ++t) {
        const int64_t index = at.record(b, h, t);
        const std::span<const uint8_t> key = record_bytes(a.cache.k_pages, index);
        check_key(key.data(), b, t, h);
        std::copy(key.begin(), key.end(), keys.begin() + t * key_bytes);
        a.cache.v_codec->decode(checked_turboquant_record(a.kOp, a.cache.v_pages, "cache.v_pages", index, b, t, h),
                                decoded);
        std::copy(decoded.begin(), decoded.end(), values.begin() + t * d);
      }
      std::vector<double> scores(static_cast<size_t>(length));
      for (int64_t g = 0; g < group; ++g) {
        const int64_t q_at = (b * hq + h * group + g) * d;
        // f16 and bf16 widen to f32 exactly: the estimator sees the query as stored.
        for (int64_t j = 0; j < d; ++j) query[size_t(j)] = float(load(a.q, q_at + j));
        score_keys(std::span<const float>(query), std::span<const uint8_t>(keys), std::span<double>(scores));
        for (double& score : scores) score *= a.options.scale;
        attend_scores(a.out, q_at, scores, values, length);
      }
    }
  }
}

}  // namespace decodelab::reference
