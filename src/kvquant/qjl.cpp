// QJL keys, the double-precision reference: Zandieh, Daliri, Han, "QJL: 1-Bit Quantized JL
// Transform for KV Cache Quantization with Zero Overhead", arXiv:2406.03482 (2024). A key is kept
// as its norm and the signs of a seeded Gaussian sketch of it; a query, kept in full precision,
// is sketched with the same matrix and scored by the paper's asymmetric estimator. The estimator,
// its unbiasedness and exact variance, and the record layout are in include/decodelab/kvquant.h.
#include <fmt/format.h>

#include <cmath>
#include <numbers>
#include <string>

#include "core/check.h"
#include "decodelab/error.h"
#include "decodelab/kvquant.h"
#include "kvquant/record.h"
#include "kvquant/seeded_stream.h"

namespace decodelab::kvquant {
namespace {

using detail::kNormBytes;

const QjlConfig& checked(const QjlConfig& config) {
  const detail::ArgCheck check("qjl");
  // D = 1 would make the sign a function of the key's sign alone; 4096 matches the dense rotation.
  if (config.head_dim < 2 || config.head_dim > 4096) {
    check.fail("config.head_dim", "D in [2, 4096]", std::to_string(config.head_dim));
  }
  // 16384 x 4096 doubles is 512 MiB: a sketch beyond that is not a reference anyone wants.
  if (config.sketch_dim < 1 || config.sketch_dim > 16384) {
    check.fail("config.sketch_dim", "m in [1, 16384]", std::to_string(config.sketch_dim));
  }
  return config;
}

std::vector<double> gaussian_sketch(int64_t m, int64_t d, uint64_t seed) {
  detail::SeededStream stream(seed);
  std::vector<double> s(size_t(m) * size_t(d));
  for (double& v : s) v = stream.normal();  // row-major: S[0][0], S[0][1], ...
  return s;
}

void check_vector(const detail::ArgCheck& check, std::string_view name, int64_t head_dim, size_t size) {
  if (int64_t(size) != head_dim) check.fail(name, fmt::format("{} values (head_dim)", head_dim), std::to_string(size));
}

}  // namespace

QjlKeys::QjlKeys(const QjlConfig& config)
    : config_(checked(config)), sketch_(gaussian_sketch(config.sketch_dim, config.head_dim, config.seed)) {}

int64_t QjlKeys::record_bytes() const { return kNormBytes + packed_bytes(config_.sketch_dim, 1); }

void QjlKeys::encode(std::span<const float> k, std::span<uint8_t> record) const {
  const detail::ArgCheck check("qjl.encode");
  const size_t d = size_t(config_.head_dim), m = size_t(config_.sketch_dim);
  check_vector(check, "k", config_.head_dim, k.size());
  if (int64_t(record.size()) != record_bytes()) {
    check.fail("record", fmt::format("{} bytes (record_bytes())", record_bytes()), fmt::format("{} bytes", record.size()));
  }
  const double norm = detail::checked_norm(check, k, "k");
  // Only the sign of each projection is kept, so it is taken in double and handed to pack_signs
  // as +-1: rounding (S k)_i to f32 first would turn a tiny negative projection into -0.0f,
  // which pack_signs reads as +1.
  std::vector<float> signs(m);
  for (size_t i = 0; i < m; ++i) {
    double projection = 0.0;
    for (size_t j = 0; j < d; ++j) projection += sketch_[i * d + j] * double(k[j]);
    signs[i] = projection < 0.0 ? -1.0f : 1.0f;
  }
  detail::store_f32_le(record.data(), float(norm));
  pack_signs(signs, record.subspan(kNormBytes));
}

void QjlKeys::score(std::span<const float> q, std::span<const uint8_t> records, std::span<double> scores) const {
  score_records("qjl.score", q, records, scores);
}

double QjlKeys::estimate(std::span<const float> q, std::span<const uint8_t> record) const {
  double estimate = 0.0;
  score_records("qjl.estimate", q, record, std::span<double>(&estimate, 1));
  return estimate;
}

// score() and estimate() differ only in how they name their arguments: estimate()'s one record
// is "record", score()'s are "records" (and "records[j] norm").
void QjlKeys::score_records(std::string_view op, std::span<const float> q, std::span<const uint8_t> records,
                            std::span<double> scores) const {
  const detail::ArgCheck check(op);
  const bool one_record = op == "qjl.estimate";
  const size_t d = size_t(config_.head_dim), m = size_t(config_.sketch_dim);
  check_vector(check, "q", config_.head_dim, q.size());
  const size_t bytes = size_t(record_bytes());
  if (records.size() != scores.size() * bytes) {
    if (one_record) {
      check.fail("record", fmt::format("{} bytes (record_bytes())", bytes), fmt::format("{} bytes", records.size()));
    }
    check.fail("records", fmt::format("{} records of {} bytes = {} bytes (one per score)", scores.size(), bytes,
                                      scores.size() * bytes),
               fmt::format("{} bytes", records.size()));
  }
  detail::check_finite(check, q, "q");

  // S q once for every key: the query is never quantized (the estimator is asymmetric).
  std::vector<double> sq(m);
  for (size_t i = 0; i < m; ++i) {
    double sum = 0.0;
    for (size_t j = 0; j < d; ++j) sum += sketch_[i * d + j] * double(q[j]);
    sq[i] = sum;
  }
  // sqrt(pi/2) undoes E|g.k| = sqrt(2/pi) ||k|| for g ~ N(0, I): the mean of the signed
  // projections is sqrt(2/pi) <q, k> / ||k||.
  const double scale = std::sqrt(std::numbers::pi / 2.0) / double(m);
  std::vector<float> signs(m);
  for (size_t n = 0; n < scores.size(); ++n) {
    const std::span<const uint8_t> record = records.subspan(n * bytes, bytes);
    const float norm = detail::load_f32_le(record.data());
    // The name is formatted only on failure: this loop runs once per key.
    if (!detail::is_valid_norm(norm)) {
      detail::fail_record_norm(check, one_record ? std::string("record norm") : fmt::format("records[{}] norm", n), norm);
    }
    unpack_signs(record.subspan(kNormBytes), signs);
    double sum = 0.0;
    for (size_t i = 0; i < m; ++i) sum += double(signs[i]) * sq[i];
    scores[n] = scale * double(norm) * sum;
  }
}

}  // namespace decodelab::kvquant
