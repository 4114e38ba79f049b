// RaBitQ keys, the double-precision reference: Gao, Long, "RaBitQ: Quantizing High-Dimensional
// Vectors with a Theoretical Error Bound for Approximate Nearest Neighbor Search",
// arXiv:2405.12497 (SIGMOD 2024), and its B-bit extension, Gao, Gou, Xu, Yang, Long, Wong,
// arXiv:2409.09913 (SIGMOD 2025): the rescaling search for the code, the estimator with its
// correction factor, randomized rounding of the query and bit-plane popcount scoring. The
// estimator, its error law and bound, and the record layout are in include/decodelab/kvquant.h.
#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "core/check.h"
#include "decodelab/error.h"
#include "decodelab/kvquant.h"
#include "kvquant/rabitq_record.h"
#include "kvquant/record.h"
#include "kvquant/seeded_stream.h"

namespace decodelab::kvquant {
namespace {

constexpr int64_t kCorrectionOffset = detail::kRabitqCorrectionOffset;
constexpr int64_t kPlanesOffset = detail::kRabitqPlanesOffset;

const RabitqConfig& checked(const RabitqConfig& config) {
  const detail::ArgCheck check("rabitq");
  // D = 1 leaves no dimension orthogonal to the key for the error to live in (the bound divides
  // by D - 1); 4096 matches the dense rotation.
  if (config.head_dim < 2 || config.head_dim > 4096) {
    check.fail("config.head_dim", "D in [2, 4096]", std::to_string(config.head_dim));
  }
  if (config.rotation == RotationKind::hadamard && config.head_dim % 16 != 0) {
    check.fail("config.head_dim", "a multiple of 16 for a hadamard rotation", std::to_string(config.head_dim));
  }
  if (config.bits < 1 || config.bits > 4) check.fail("config.bits", "1, 2, 3 or 4", std::to_string(config.bits));
  // The codes are bytes.
  if (config.query_bits < 1 || config.query_bits > 8) {
    check.fail("config.query_bits", "Bq in 1..8", std::to_string(config.query_bits));
  }
  if (!config.centroid.empty()) {
    if (int64_t(config.centroid.size()) != config.head_dim) {
      check.fail("config.centroid", fmt::format("empty (the zero centroid) or {} values (head_dim)", config.head_dim),
                 fmt::format("{} values", config.centroid.size()));
    }
    detail::check_finite(check, config.centroid, "config.centroid");
  }
  return config;
}

void check_vector(const detail::ArgCheck& check, std::string_view name, int64_t head_dim, size_t size) {
  if (int64_t(size) != head_dim) check.fail(name, fmt::format("{} values (head_dim)", head_dim), std::to_string(size));
}

void check_record(const detail::ArgCheck& check, int64_t record_bytes, size_t size) {
  if (int64_t(size) != record_bytes) {
    check.fail("record", fmt::format("{} bytes (record_bytes())", record_bytes), fmt::format("{} bytes", size));
  }
}

double dot(std::span<const double> a, std::span<const double> b) {
  double sum = 0.0;
  for (size_t j = 0; j < a.size(); ++j) sum += a[j] * b[j];
  return sum;
}

// <q, c> in double; 0 for the zero centroid.
double centroid_dot(std::span<const float> q, std::span<const float> c) {
  double sum = 0.0;
  for (size_t j = 0; j < c.size(); ++j) sum += double(q[j]) * double(c[j]);
  return sum;
}

// The codes u of the grid point whose direction is nearest o' (kvquant.h): the rescaling search
// over t, each step raising one |y_j| by 1, taken in order of t (ties by coordinate, so that the
// codes are a function of o' alone).
std::vector<uint8_t> nearest_codes(std::span<const double> rotated, int bits) {
  const size_t d = rotated.size();
  const int half = 1 << (bits - 1);  // |y_j| = level_j + 1/2, level_j in [0, half)
  std::vector<std::pair<double, size_t>> steps;
  steps.reserve(d * size_t(half - 1));
  for (size_t j = 0; j < d; ++j) {
    const double a = std::fabs(rotated[j]);
    if (a == 0.0) continue;  // a zero coordinate never steps: |y_j| = 1/2 is nearest it
    for (int s = 1; s < half; ++s) steps.emplace_back(double(s) / a, j);
  }
  std::sort(steps.begin(), steps.end());
  // At t -> 0 every |y_j| is 1/2. <|y|, |o'|> and ||y||^2 follow each step: (s + 1/2)^2 -
  // (s - 1/2)^2 = 2s, an integer, so ||y||^2 is exact.
  double along = 0.0;
  for (double v : rotated) along += 0.5 * std::fabs(v);
  double length2 = 0.25 * double(d);
  std::vector<int> level(d, 0);
  double best_cosine = along / std::sqrt(length2);
  size_t best_steps = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    const size_t j = steps[i].second;
    ++level[j];
    along += std::fabs(rotated[j]);
    length2 += 2.0 * double(level[j]);
    const double cosine = along / std::sqrt(length2);
    if (cosine > best_cosine) {
      best_cosine = cosine;
      best_steps = i + 1;
    }
  }
  std::fill(level.begin(), level.end(), 0);
  for (size_t i = 0; i < best_steps; ++i) ++level[steps[i].second];
  // y_j = +-(level_j + 1/2), u_j = y_j + (2^B - 1)/2.
  std::vector<uint8_t> codes(d);
  for (size_t j = 0; j < d; ++j) codes[j] = uint8_t(rotated[j] >= 0.0 ? half + level[j] : half - 1 - level[j]);
  return codes;
}

// y_j = u_j - (2^B - 1)/2.
double grid_point(uint8_t code, int bits) { return double(code) - 0.5 * double((1 << bits) - 1); }

// The bit planes of `codes` (one pack_bits 1-bit stream per bit, bit 0 first) into `planes`.
void pack_planes(std::span<const uint8_t> codes, int bits, std::span<uint8_t> planes) {
  const size_t plane_bytes = planes.size() / size_t(bits);
  std::vector<uint8_t> plane(codes.size());
  for (int a = 0; a < bits; ++a) {
    for (size_t j = 0; j < codes.size(); ++j) plane[j] = uint8_t((codes[j] >> a) & 1u);
    pack_bits(plane, 1, planes.subspan(size_t(a) * plane_bytes, plane_bytes));
  }
}

std::vector<uint8_t> unpack_planes(std::span<const uint8_t> planes, int bits, size_t d) {
  const size_t plane_bytes = planes.size() / size_t(bits);
  std::vector<uint8_t> codes(d, 0), plane(d);
  for (int a = 0; a < bits; ++a) {
    unpack_bits(planes.subspan(size_t(a) * plane_bytes, plane_bytes), 1, plane);
    for (size_t j = 0; j < d; ++j) codes[j] = uint8_t(codes[j] | (plane[j] << a));
  }
  return codes;
}

int64_t and_popcount(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  int64_t count = 0;
  for (size_t i = 0; i < a.size(); ++i) count += std::popcount(unsigned(a[i] & b[i]));
  return count;
}

// A record's norm and correction, checked: no encoder writes a correction outside (0, 1].
struct RecordFactors {
  float norm, correction;
};
RecordFactors checked_factors(const detail::ArgCheck& check, std::span<const uint8_t> record, bool one_record,
                              size_t n) {
  const float norm = detail::load_f32_le(record.data());
  const float correction = detail::load_f32_le(record.data() + kCorrectionOffset);
  // The names are formatted only on failure: score() checks every record.
  if (!detail::is_valid_norm(norm)) {
    detail::fail_record_norm(check, one_record ? std::string("record norm") : fmt::format("records[{}] norm", n), norm);
  }
  if (!detail::is_valid_rabitq_correction(correction)) {
    detail::fail_rabitq_correction(
        check, one_record ? std::string("record correction") : fmt::format("records[{}] correction", n), correction);
  }
  return {norm, correction};
}

}  // namespace

RabitqKeys::RabitqKeys(const RabitqConfig& config)
    : config_(checked(config)), rotation_(Rotation::make(config.rotation, config.head_dim, config.seed)) {}

int64_t RabitqKeys::record_bytes() const { return kPlanesOffset + config_.bits * packed_bytes(config_.head_dim, 1); }

void RabitqKeys::encode(std::span<const float> k, std::span<uint8_t> record) const {
  const detail::ArgCheck check("rabitq.encode");
  const size_t d = size_t(config_.head_dim);
  check_vector(check, "k", config_.head_dim, k.size());
  check_record(check, record_bytes(), record.size());
  const std::span<const float> c = config_.centroid;
  const double norm = detail::checked_distance(check, k, c, "k");

  std::vector<double> rotated(d, 0.0);  // o' = 0 for a key at the centroid: its direction is moot
  if (norm > 0.0) {
    for (size_t j = 0; j < d; ++j) rotated[j] = (double(k[j]) - (c.empty() ? 0.0 : double(c[j]))) / norm;
  }
  rotation_.apply(rotated, rotated);
  const std::vector<uint8_t> codes = nearest_codes(rotated, config_.bits);
  double along = 0.0, length2 = 0.0;
  for (size_t j = 0; j < d; ++j) {
    const double y = grid_point(codes[j], config_.bits);
    along += y * rotated[j];
    length2 += y * y;
  }
  const double correction = norm > 0.0 ? along / std::sqrt(length2) : 1.0;

  detail::store_f32_le(record.data(), float(norm));
  detail::store_f32_le(record.data() + kCorrectionOffset, float(correction));
  pack_planes(codes, config_.bits, record.subspan(kPlanesOffset));
}

void RabitqKeys::decode(std::span<const uint8_t> record, std::span<float> x) const {
  const detail::ArgCheck check("rabitq.decode");
  const size_t d = size_t(config_.head_dim);
  check_record(check, record_bytes(), record.size());
  check_vector(check, "x", config_.head_dim, x.size());
  const RecordFactors f = checked_factors(check, record, true, 0);
  const std::vector<uint8_t> codes = unpack_planes(record.subspan(kPlanesOffset), config_.bits, d);
  std::vector<double> y(d);
  for (size_t j = 0; j < d; ++j) y[j] = grid_point(codes[j], config_.bits);
  const double scale = double(f.norm) / (std::sqrt(dot(y, y)) * double(f.correction));
  rotation_.apply_inverse(y, y);
  for (size_t j = 0; j < d; ++j) {
    x[j] = float((config_.centroid.empty() ? 0.0 : double(config_.centroid[j])) + scale * y[j]);
  }
}

double RabitqKeys::estimate(std::span<const float> q, std::span<const uint8_t> record) const {
  const detail::ArgCheck check("rabitq.estimate");
  const size_t d = size_t(config_.head_dim);
  check_vector(check, "q", config_.head_dim, q.size());
  check_record(check, record_bytes(), record.size());
  detail::check_finite(check, q, "q");
  const RecordFactors f = checked_factors(check, record, true, 0);
  const std::vector<uint8_t> codes = unpack_planes(record.subspan(kPlanesOffset), config_.bits, d);
  std::vector<double> y(d), rotated(q.begin(), q.end());
  for (size_t j = 0; j < d; ++j) y[j] = grid_point(codes[j], config_.bits);
  rotation_.apply(rotated, rotated);
  // <o_bar, q> = <R^T y, q> / ||y|| = <y, R q> / ||y||.
  return centroid_dot(q, config_.centroid) +
         double(f.norm) * dot(y, rotated) / (std::sqrt(dot(y, y)) * double(f.correction));
}

RabitqQuery RabitqKeys::quantize_query(std::span<const float> q, uint64_t rounding_seed) const {
  const detail::ArgCheck check("rabitq.quantize_query");
  const size_t d = size_t(config_.head_dim);
  check_vector(check, "q", config_.head_dim, q.size());
  detail::check_finite(check, q, "q");
  std::vector<double> rotated(q.begin(), q.end());
  rotation_.apply(rotated, rotated);
  const auto [lo, hi] = std::minmax_element(rotated.begin(), rotated.end());
  const int top = (1 << config_.query_bits) - 1;
  RabitqQuery query;
  query.lower = *lo;
  query.step = (*hi - *lo) / double(top);
  query.centroid_dot = centroid_dot(q, config_.centroid);
  query.codes.assign(d, 0);
  if (query.step == 0.0) return query;  // q' is constant: v_l alone is exact
  detail::SeededStream stream(rounding_seed);
  for (size_t j = 0; j < d; ++j) {
    // floor(x + r) is floor(x) + 1 with probability frac(x): its mean is x. x is in [0, top] up
    // to rounding, so the clamp only catches x a hair above top.
    const double x = (rotated[j] - query.lower) / query.step;
    query.codes[j] = uint8_t(std::min(std::floor(x + stream.uniform()), double(top)));
  }
  return query;
}

void RabitqKeys::score(const RabitqQuery& query, std::span<const uint8_t> records, std::span<double> scores) const {
  const detail::ArgCheck check("rabitq.score");
  const int bits = config_.bits, query_bits = config_.query_bits;
  const int64_t d = config_.head_dim;
  check_vector(check, "query.codes", d, query.codes.size());
  for (size_t j = 0; j < query.codes.size(); ++j) {
    if (query.codes[j] >> query_bits) {
      check.fail(fmt::format("query.codes[{}]", j), fmt::format("a code below 2^{} (query_bits)", query_bits),
                 std::to_string(query.codes[j]));
    }
  }
  const size_t bytes = size_t(record_bytes());
  if (records.size() != scores.size() * bytes) {
    check.fail("records", fmt::format("{} records of {} bytes = {} bytes (one per score)", scores.size(), bytes,
                                      scores.size() * bytes),
               fmt::format("{} bytes", records.size()));
  }

  // The query's planes once for every key. Their spare bits are zero (pack_bits writes them so);
  // a key's are ignored when reading (the layout), so they are cleared in a copy, `ones` the mask.
  const size_t plane_bytes = size_t(packed_bytes(d, 1));
  std::vector<uint8_t> query_planes(size_t(query_bits) * plane_bytes), ones(plane_bytes);
  pack_planes(query.codes, query_bits, query_planes);
  pack_bits(std::vector<uint8_t>(size_t(d), 1), 1, ones);
  int64_t query_sum = 0;
  for (uint8_t v : query.codes) query_sum += v;
  const int64_t m = (int64_t{1} << bits) - 1;

  std::vector<uint8_t> key_planes(size_t(bits) * plane_bytes);
  auto key_plane = [&](int a) {
    return std::span<const uint8_t>(key_planes).subspan(size_t(a) * plane_bytes, plane_bytes);
  };
  auto query_plane = [&](int b) {
    return std::span<const uint8_t>(query_planes).subspan(size_t(b) * plane_bytes, plane_bytes);
  };
  for (size_t n = 0; n < scores.size(); ++n) {
    const std::span<const uint8_t> record = records.subspan(n * bytes, bytes);
    const RecordFactors f = checked_factors(check, record, false, n);
    const std::span<const uint8_t> planes = record.subspan(kPlanesOffset);
    for (size_t i = 0; i < key_planes.size(); ++i) key_planes[i] = uint8_t(planes[i] & ones[i % plane_bytes]);
    int64_t dot_codes = 0, code_sum = 0, code_sum2 = 0;  // <u, q_u>, sum u_j, sum u_j^2
    for (int a = 0; a < bits; ++a) {
      for (int b = 0; b < query_bits; ++b) dot_codes += and_popcount(key_plane(a), query_plane(b)) << (a + b);
      code_sum += and_popcount(key_plane(a), key_plane(a)) << a;
      for (int a2 = 0; a2 < bits; ++a2) code_sum2 += and_popcount(key_plane(a), key_plane(a2)) << (a + a2);
    }
    const int64_t s = 2 * dot_codes - m * query_sum;              // <2y, q_u>
    const int64_t t = 2 * code_sum - m * d;                       // sum_j 2 y_j
    const int64_t y2 = 4 * code_sum2 - 4 * m * code_sum + m * m * d;  // ||2y||^2
    scores[n] = query.centroid_dot + double(f.norm) * (query.step * double(s) + query.lower * double(t)) /
                                         (std::sqrt(double(y2)) * double(f.correction));
  }
}

double rabitq_error_bound(double key_norm, double query_norm, double correction, int64_t dim, double epsilon0) {
  const detail::ArgCheck check("rabitq_error_bound");
  if (!(key_norm >= 0.0 && std::isfinite(key_norm))) check.fail("key_norm", "a finite norm >= 0", fmt::format("{}", key_norm));
  if (!(query_norm >= 0.0 && std::isfinite(query_norm))) {
    check.fail("query_norm", "a finite norm >= 0", fmt::format("{}", query_norm));
  }
  if (!(correction > 0.0 && correction <= 1.0)) check.fail("correction", "<o_bar, o> in (0, 1]", fmt::format("{}", correction));
  if (dim < 2) check.fail("dim", "D >= 2", std::to_string(dim));
  if (!(epsilon0 >= 0.0 && std::isfinite(epsilon0))) check.fail("epsilon0", "a finite eps0 >= 0", fmt::format("{}", epsilon0));
  return key_norm * query_norm * std::sqrt(1.0 - correction * correction) / correction * epsilon0 /
         std::sqrt(double(dim - 1));
}

double rabitq_bound_failure_probability(double epsilon0) {
  if (!(epsilon0 >= 0.0 && std::isfinite(epsilon0))) {
    fail("rabitq_bound_failure_probability", "epsilon0", "a finite eps0 >= 0", fmt::format("{}", epsilon0));
  }
  return std::min(1.0, 2.0 * std::exp(-0.5 * epsilon0 * epsilon0));
}

}  // namespace decodelab::kvquant
