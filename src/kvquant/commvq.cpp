// CommVQ (arXiv:2506.18879), the double-precision reference: residual k-means training of the
// RoPE-commutative codebooks, greedy residual encoding, decoding with and without RoPE in code
// space, and code-space scoring. What each computes and the record layout are in
// include/decodelab/commvq.h.
#include "decodelab/commvq.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/check.h"
#include "decodelab/error.h"
#include "decodelab/product_vq.h"
#include "kvquant/bitstream.h"
#include "kvquant/nearest.h"
#include "kvquant/record.h"

namespace decodelab::kvquant {
namespace {

constexpr int kMaxBits = 12;
constexpr int kMaxCodebooks = 16;
constexpr int kMaxIterations = 10000;

void check_config(const detail::ArgCheck& check, const CommVqConfig& c) {
  if (c.head_dim < 2 || c.head_dim > 4096 || c.head_dim % 2 != 0) {
    check.fail("config.head_dim", "an even number in [2, 4096] (whole RoPE pairs)", std::to_string(c.head_dim));
  }
  if (c.group_pairs < 1 || c.pairs() % c.group_pairs != 0) {
    check.fail("config.group_pairs", fmt::format("a divisor of head_dim / 2 = {} (groups hold whole RoPE pairs)", c.pairs()),
               std::to_string(c.group_pairs));
  }
  if (c.codebooks < 1 || c.codebooks > kMaxCodebooks) {
    check.fail("config.codebooks", fmt::format("1 to {}", kMaxCodebooks), std::to_string(c.codebooks));
  }
  if (c.bits < 1 || c.bits > kMaxBits) check.fail("config.bits", fmt::format("1 to {}", kMaxBits), std::to_string(c.bits));
  if (c.kmeans_iterations < 1 || c.kmeans_iterations > kMaxIterations) {
    check.fail("config.kmeans_iterations", fmt::format("1 to {}", kMaxIterations), std::to_string(c.kmeans_iterations));
  }
  if (!std::isfinite(c.rope.theta) || !(c.rope.theta > 0.0f)) {
    check.fail("config.rope.theta", "a finite value > 0", fmt::format("{}", c.rope.theta));
  }
  // A partial rotary head would leave coordinates that RoPE never pairs, outside the complex view.
  if (c.rope.rotary_dim != 0 && c.rope.rotary_dim != c.head_dim) {
    check.fail("config.rope.rotary_dim", fmt::format("0 or head_dim = {} (the whole head rotated)", c.head_dim),
               std::to_string(c.rope.rotary_dim));
  }
}

void check_size(const detail::ArgCheck& check, std::string_view name, size_t size, int64_t want, std::string_view what) {
  if (int64_t(size) != want) check.fail(name, fmt::format("{} {}", want, what), std::to_string(size));
}

void check_position(const detail::ArgCheck& check, std::string_view name, int64_t position) {
  if (position < 0) check.fail(name, "a position >= 0", std::to_string(position));
}

}  // namespace

CommVqCodebook::CommVqCodebook(const CommVqConfig& config, std::vector<float> codewords)
    : config_(config), codewords_(std::move(codewords)) {
  const detail::ArgCheck check("commvq");
  check_config(check, config_);
  check_size(check, "codewords", codewords_.size(), config_.codeword_count(), "values (groups x codebooks x 2^bits x group_pairs x 2)");
  detail::check_finite(check, codewords_, "codewords");
  for (int64_t j = 0; j < config_.pairs(); ++j) inv_frequency_.push_back(rope_inv_frequency(config_.rope, int(config_.head_dim), int(j)));
}

int64_t CommVqCodebook::record_bytes() const { return (config_.bits_per_token() + 7) / 8; }

std::pair<int64_t, int64_t> CommVqCodebook::pair_coordinates(int64_t j) const {
  if (config_.rope.style == RopeStyle::half_split) return {j, j + config_.pairs()};
  return {2 * j, 2 * j + 1};
}

void CommVqCodebook::encode(std::span<const float> x, std::span<uint8_t> record) const {
  const detail::ArgCheck check("commvq.encode");
  check_size(check, "x", x.size(), config_.head_dim, "values (head_dim)");
  check_size(check, "record", record.size(), record_bytes(), "bytes (record_bytes())");
  detail::check_finite(check, x, "x");
  // The key as complex pairs, group g's part at [g 2P, (g + 1) 2P): the residual each codebook sees.
  std::vector<double> residual(size_t(config_.head_dim));
  for (int64_t j = 0; j < config_.pairs(); ++j) {
    const auto [a, b] = pair_coordinates(j);
    residual[size_t(2 * j)] = x[size_t(a)];
    residual[size_t(2 * j + 1)] = x[size_t(b)];
  }
  const int64_t k = config_.codewords_per_codebook(), width = 2 * config_.group_pairs;
  std::fill(record.begin(), record.end(), uint8_t{0});  // put_stream_bits ORs into the bytes
  for (int64_t g = 0; g < config_.groups(); ++g) {
    double* part = &residual[size_t(g * width)];
    for (int64_t m = 0; m < config_.codebooks; ++m) {
      const auto book = std::span<const float>(codewords_).subspan(size_t((g * config_.codebooks + m) * k * width), size_t(k * width));
      const int64_t code = detail::nearest_center(part, book, k, width).first;
      for (int64_t j = 0; j < width; ++j) part[j] -= double(book[size_t(code * width + j)]);
      detail::put_stream_bits(record, size_t(g * config_.codebooks + m), config_.bits, unsigned(code));
    }
  }
}

std::vector<uint16_t> CommVqCodebook::codes(std::span<const uint8_t> record) const {
  check_size(detail::ArgCheck("commvq.codes"), "record", record.size(), record_bytes(), "bytes (record_bytes())");
  std::vector<uint16_t> out(size_t(config_.groups() * config_.codebooks));
  for (size_t i = 0; i < out.size(); ++i) out[i] = uint16_t(detail::get_stream_bits(record, i, config_.bits));
  return out;
}

void CommVqCodebook::decode(std::span<const uint8_t> record, std::span<float> x) const { decode_rotated(record, 0, x); }

void CommVqCodebook::decode_rotated(std::span<const uint8_t> record, int64_t position, std::span<float> x) const {
  const detail::ArgCheck check("commvq.decode");
  check_size(check, "x", x.size(), config_.head_dim, "values (head_dim)");
  check_position(check, "position", position);
  const std::vector<uint16_t> code = codes(record);
  const int64_t k = config_.codewords_per_codebook(), P = config_.group_pairs;
  for (int64_t j = 0; j < config_.pairs(); ++j) {
    const int64_t g = j / P, p = j % P;
    // Every codeword turned on its own, then summed: the right-hand side of the commutation.
    const double c = std::cos(angle(j, position)), s = std::sin(angle(j, position));
    double re = 0.0, im = 0.0;
    for (int64_t m = 0; m < config_.codebooks; ++m) {
      const float* w = &codewords_[size_t((((g * config_.codebooks + m) * k + code[size_t(g * config_.codebooks + m)]) * P + p) * 2)];
      re += double(w[0]) * c - double(w[1]) * s;
      im += double(w[1]) * c + double(w[0]) * s;
    }
    const auto [a, b] = pair_coordinates(j);
    x[size_t(a)] = float(re);
    x[size_t(b)] = float(im);
  }
}

CommVqQuery CommVqCodebook::prepare_query(std::span<const float> q) const {
  const detail::ArgCheck check("commvq.prepare_query");
  check_size(check, "q", q.size(), config_.head_dim, "values (head_dim)");
  detail::check_finite(check, q, "q");
  const int64_t k = config_.codewords_per_codebook(), P = config_.group_pairs;
  CommVqQuery query{std::vector<double>(codewords_.size())};
  for (int64_t j = 0; j < config_.pairs(); ++j) {
    const int64_t g = j / P, p = j % P;
    const auto [a, b] = pair_coordinates(j);
    const double qa = q[size_t(a)], qb = q[size_t(b)];
    for (int64_t m = 0; m < config_.codebooks; ++m) {
      for (int64_t c = 0; c < k; ++c) {
        const size_t at = size_t((((g * config_.codebooks + m) * k + c) * P + p) * 2);
        const double xa = codewords_[at], xb = codewords_[at + 1];
        query.table[at] = qa * xa + qb * xb;      // Re(conj(q_j) x)
        query.table[at + 1] = qa * xb - qb * xa;  // Im(conj(q_j) x)
      }
    }
  }
  return query;
}

double CommVqCodebook::score(const CommVqQuery& query, int64_t position, std::span<const uint8_t> record) const {
  double out = 0.0;
  score_run(query, position, record, std::span<double>(&out, 1));
  return out;
}

void CommVqCodebook::score_run(const CommVqQuery& query, int64_t first_position, std::span<const uint8_t> records,
                               std::span<double> scores) const {
  const detail::ArgCheck check("commvq.score");
  check_size(check, "query.table", query.table.size(), config_.codeword_count(), "values (from prepare_query)");
  check_position(check, "first_position", first_position);
  const size_t bytes = size_t(record_bytes());
  if (records.size() != scores.size() * bytes) {
    check.fail("records", fmt::format("{} records of {} bytes (one per score)", scores.size(), bytes), fmt::format("{} bytes", records.size()));
  }
  const int64_t k = config_.codewords_per_codebook(), P = config_.group_pairs, M = config_.codebooks;
  std::vector<unsigned> code(size_t(config_.groups() * M));
  for (size_t r = 0; r < scores.size(); ++r) {
    const std::span<const uint8_t> record = records.subspan(r * bytes, bytes);
    for (size_t i = 0; i < code.size(); ++i) code[i] = detail::get_stream_bits(record, i, config_.bits);
    const int64_t position = first_position + int64_t(r);
    double sum = 0.0;
    for (int64_t j = 0; j < config_.pairs(); ++j) {
      const int64_t g = j / P, p = j % P;
      double re = 0.0, im = 0.0;
      for (int64_t m = 0; m < M; ++m) {
        const size_t at = size_t((((g * M + m) * k + code[size_t(g * M + m)]) * P + p) * 2);
        re += query.table[at];
        im += query.table[at + 1];
      }
      // Re(e^{i t w_j} (re + i im)): the rotation applied once per pair, to the table sum.
      const double theta = angle(j, position);
      sum += re * std::cos(theta) - im * std::sin(theta);
    }
    scores[r] = sum;
  }
}

CommVqFit train_commvq(const CommVqConfig& config, std::span<const float> calibration, int64_t n) {
  const detail::ArgCheck check("train_commvq");
  check_config(check, config);
  const int64_t dim = config.head_dim, k = config.codewords_per_codebook(), width = 2 * config.group_pairs, M = config.codebooks;
  if (n < k) check.fail("n", fmt::format("at least 2^bits = {} calibration keys (one per codeword)", k), std::to_string(n));
  check_size(check, "calibration", calibration.size(), n * dim, "values (n x head_dim)");
  detail::check_finite(check, calibration, "calibration");

  // Pairing does not depend on the codewords: a placeholder codebook answers pair_coordinates.
  const CommVqCodebook layout(config, std::vector<float>(size_t(config.codeword_count())));
  std::vector<float> codewords(size_t(config.codeword_count()));
  std::vector<double> stage_total(size_t(M + 1), 0.0);
  std::vector<double> residual(size_t(n * width));
  for (int64_t g = 0; g < config.groups(); ++g) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t p = 0; p < config.group_pairs; ++p) {
        const auto [a, b] = layout.pair_coordinates(g * config.group_pairs + p);
        residual[size_t(i * width + 2 * p)] = calibration[size_t(i * dim + a)];
        residual[size_t(i * width + 2 * p + 1)] = calibration[size_t(i * dim + b)];
      }
    }
    for (double v : residual) stage_total[0] += v * v;
    for (int64_t m = 0; m < M; ++m) {
      const KmeansResult fit = kmeans(residual, n, width, k, config.kmeans_iterations, config.training_seed + uint64_t(g * M + m));
      const auto book = std::span<float>(codewords).subspan(size_t((g * M + m) * k * width), size_t(k * width));
      std::transform(fit.centers.begin(), fit.centers.end(), book.begin(), [](double v) { return float(v); });
      // What the next codebook sees: each key's residual less its nearest stored (f32) codeword,
      // the same search encode() makes, so that training and encoding agree.
      for (int64_t i = 0; i < n; ++i) {
        double* r = &residual[size_t(i * width)];
        const int64_t code = detail::nearest_center(r, std::span<const float>(book), k, width).first;
        for (int64_t j = 0; j < width; ++j) {
          r[j] -= double(book[size_t(code * width + j)]);
          stage_total[size_t(m + 1)] += r[j] * r[j];
        }
      }
    }
  }
  std::vector<double> distortion;
  for (double total : stage_total) distortion.push_back(total / double(n));
  return {CommVqCodebook(config, std::move(codewords)), std::move(distortion)};
}

}  // namespace decodelab::kvquant
