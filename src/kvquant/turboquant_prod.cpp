// TurboQuant (inner product), the double-precision reference: Zandieh, Daliri, Hadian, Mirrokni,
// "TurboQuant: Online Vector Quantization with Near-optimal Distortion Rate", arXiv:2504.19874
// (2025), Algorithm 2. TurboQuant (MSE) at b - 1 bits, then 1-bit QJL (arXiv:2406.03482) with
// m = D on the residual, so that inner products are unbiased. The estimator, its variance, the
// caveat against the MSE quantizer and the record layout are in include/decodelab/kvquant.h.
#include <fmt/format.h>

#include <cmath>
#include <numbers>
#include <string>

#include "core/check.h"
#include "decodelab/error.h"
#include "decodelab/kvquant.h"
#include "kvquant/record.h"

namespace decodelab::kvquant {
namespace {

constexpr std::string_view kOp = "turboquant_prod";

const TurboQuantProdConfig& checked(const TurboQuantProdConfig& config) {
  const detail::ArgCheck check(kOp);
  check.head_dim(config.head_dim, "config.head_dim");
  if (config.bits < 2 || config.bits > 5) {
    check.fail("config.bits", "2, 3, 4 or 5 (b - 1 = 1..4 bits of MSE codes, 1 of QJL signs)", std::to_string(config.bits));
  }
  if (config.sketch_seed == config.seed) {
    check.fail("config.sketch_seed", fmt::format("a seed other than config.seed = {} (the rotation's)", config.seed),
               std::to_string(config.sketch_seed));
  }
  return config;
}

TurboQuantConfig mse_config(const TurboQuantProdConfig& c) {
  return {.head_dim = c.head_dim, .bits = c.bits - 1, .rotation = c.rotation, .seed = c.seed, .scale = ScaleMode::plain};
}

QjlConfig qjl_config(const TurboQuantProdConfig& c) {
  return {.head_dim = c.head_dim, .sketch_dim = c.head_dim, .seed = c.sketch_seed};
}

void check_sizes(const detail::ArgCheck& check, std::string_view name, int64_t head_dim, size_t x_size,
                 int64_t record_bytes, size_t record_size) {
  if (int64_t(x_size) != head_dim) check.fail(name, fmt::format("{} values (head_dim)", head_dim), std::to_string(x_size));
  if (int64_t(record_size) != record_bytes) {
    check.fail("record", fmt::format("{} bytes (record_bytes())", record_bytes), fmt::format("{} bytes", record_size));
  }
}

}  // namespace

TurboQuantProd::TurboQuantProd(const TurboQuantProdConfig& config)
    : config_(checked(config)), mse_(mse_config(config)), qjl_(qjl_config(config)) {}

TurboQuantProd::TurboQuantProd(const TurboQuantProdConfig& config, Codebook mse_codebook)
    : config_(checked(config)), mse_(mse_config(config), std::move(mse_codebook)), qjl_(qjl_config(config)) {}

void TurboQuantProd::encode(std::span<const float> x, std::span<uint8_t> record) const {
  const detail::ArgCheck check("turboquant_prod.encode");
  const size_t d = size_t(config_.head_dim), mse_bytes = size_t(mse_.record_bytes());
  check_sizes(check, "x", config_.head_dim, x.size(), record_bytes(), record.size());
  detail::checked_norm(check, x, "x");
  mse_.encode(x, record.first(mse_bytes));
  // The residual against the decoding every reader sees (f32), so that <q, x~_mse> + <q, r> is
  // <q, x> up to the rounding of r to f32, about 1e-8 of ||r||.
  std::vector<float> mse_x(d), residual(d);
  mse_.decode(record.first(mse_bytes), mse_x);
  for (size_t j = 0; j < d; ++j) residual[j] = float(double(x[j]) - double(mse_x[j]));
  qjl_.encode(residual, record.subspan(mse_bytes));
}

void TurboQuantProd::decode(std::span<const uint8_t> record, std::span<float> x) const {
  const detail::ArgCheck check("turboquant_prod.decode");
  const size_t d = size_t(config_.head_dim), m = size_t(qjl_.config().sketch_dim);
  const size_t mse_bytes = size_t(mse_.record_bytes());
  check_sizes(check, "x", config_.head_dim, x.size(), record_bytes(), record.size());
  const std::span<const uint8_t> qjl_record = record.subspan(mse_bytes);
  const float residual_norm = detail::checked_record_norm(check, qjl_record.data(), "record residual norm");
  mse_.decode(record.first(mse_bytes), x);
  std::vector<float> signs(m);
  unpack_signs(qjl_record.subspan(detail::kNormBytes), signs);
  // S^T sign(S r), scaled as the estimator scales it.
  std::vector<double> back(d, 0.0);
  const std::span<const double> sketch = qjl_.sketch();
  for (size_t i = 0; i < m; ++i) {
    for (size_t j = 0; j < d; ++j) back[j] += double(signs[i]) * sketch[i * d + j];
  }
  const double scale = std::sqrt(std::numbers::pi / 2.0) / double(m) * double(residual_norm);
  for (size_t j = 0; j < d; ++j) x[j] = float(double(x[j]) + scale * back[j]);
}

double TurboQuantProd::estimate(std::span<const float> q, std::span<const uint8_t> record) const {
  const detail::ArgCheck check("turboquant_prod.estimate");
  const size_t d = size_t(config_.head_dim), mse_bytes = size_t(mse_.record_bytes());
  check_sizes(check, "q", config_.head_dim, q.size(), record_bytes(), record.size());
  detail::check_finite(check, q, "q");
  const std::span<const uint8_t> qjl_record = record.subspan(mse_bytes);
  detail::checked_record_norm(check, qjl_record.data(), "record residual norm");
  std::vector<float> mse_x(d);
  mse_.decode(record.first(mse_bytes), mse_x);
  double mse_dot = 0.0;
  for (size_t j = 0; j < d; ++j) mse_dot += double(q[j]) * double(mse_x[j]);
  return mse_dot + qjl_.estimate(q, qjl_record);
}

}  // namespace decodelab::kvquant
