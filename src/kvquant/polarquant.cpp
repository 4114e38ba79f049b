// PolarQuant, the double-precision reference: Han, Kacham, Karbasi, Mirrokni, Zandieh,
// "PolarQuant: Quantizing KV Caches with Polar Transformation", arXiv:2502.02617 (2025). Random
// preconditioning (decodelab's Rotation), the recursive polar transform, and per-level Lloyd-Max
// angle codebooks fitted to the angle densities after a random rotation. The transform, the
// densities, the error of the whole and the record layout are in include/decodelab/kvquant.h.
//
// The codebooks are fitted as Codebook::lloyd_max fits the coordinate codebook: the two Lloyd-Max
// conditions (boundaries at midpoints, centroids at cell means) iterated, the cell integrals by
// 16-point Gauss-Legendre over a table of cumulative moments. f_l is smooth on [0, pi/2] (a power
// of sin(2 psi)), so no change of variable is needed.
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <numbers>
#include <string>

#include "core/check.h"
#include "decodelab/error.h"
#include "decodelab/kvquant.h"
#include "kvquant/quadrature.h"
#include "kvquant/record.h"

namespace decodelab::kvquant {
namespace {

constexpr int kMaxLevels = 12;
constexpr double kPi = std::numbers::pi;

// Integrals of psi^0, psi^1, psi^2, cos psi and sin psi times the (unnormalized) density.
struct Moments {
  double m0 = 0.0, m1 = 0.0, m2 = 0.0, cos = 0.0, sin = 0.0;
  Moments operator-(const Moments& o) const { return {m0 - o.m0, m1 - o.m1, m2 - o.m2, cos - o.cos, sin - o.sin}; }
  Moments operator+(const Moments& o) const { return {m0 + o.m0, m1 + o.m1, m2 + o.m2, cos + o.cos, sin + o.sin}; }
};

// sin^(k-1)(2 psi), k = 2^(level-1), on [0, pi/2]; 1 on [0, 2 pi) at level 1. Unnormalized: the
// Lloyd-Max conditions are ratios.
class AngleMoments {
 public:
  explicit AngleMoments(int level) : rule_(detail::gauss_legendre()) {
    if (level == 1) {
      power_ = 0.0;
      lo_ = 0.0, hi_ = 2.0 * kPi;
    } else {
      power_ = std::ldexp(1.0, level - 1) - 1.0;
      // Where sin^power(2 psi) < e^-100 there is nothing to integrate; for high levels this keeps
      // the panels narrow where the mass is (about 1 / (2 sqrt(k)) either side of pi / 4).
      const double edge = 0.5 * std::asin(std::exp(-100.0 / power_));
      lo_ = edge, hi_ = kPi / 2.0 - edge;
    }
    panel_ = (hi_ - lo_) / kPanels;
    for (int p = 0; p < kPanels; ++p) cumulative_[size_t(p + 1)] = cumulative_[size_t(p)] + integrate(edge(p), edge(p + 1));
  }

  Moments up_to(double psi) const {
    const double t = std::clamp(psi, lo_, hi_);
    const int p = std::min(kPanels - 1, int((t - lo_) / panel_));
    return cumulative_[size_t(p)] + integrate(edge(p), t);
  }
  Moments total() const { return cumulative_[kPanels]; }
  double spread() const { return hi_ - lo_; }
  double middle() const { return 0.5 * (lo_ + hi_); }

 private:
  static constexpr int kPanels = 1024;
  double edge(int p) const { return lo_ + p * panel_; }

  Moments integrate(double a, double b) const {
    const double half = 0.5 * (b - a), mid = 0.5 * (a + b);
    Moments m;
    for (int i = 0; i < detail::kGaussPoints; ++i) {
      const double psi = mid + half * rule_.nodes[size_t(i)];
      const double w = rule_.weights[size_t(i)] * half * (power_ == 0.0 ? 1.0 : std::pow(std::sin(2.0 * psi), power_));
      m.m0 += w;
      m.m1 += w * psi;
      m.m2 += w * psi * psi;
      m.cos += w * std::cos(psi);
      m.sin += w * std::sin(psi);
    }
    return m;
  }

  double power_ = 0.0;
  double lo_ = 0.0, hi_ = 0.0, panel_ = 0.0;
  detail::GaussLegendre rule_;
  std::array<Moments, kPanels + 1> cumulative_{};
};

std::vector<Moments> cell_moments(const AngleMoments& moments, std::span<const double> centroids) {
  const size_t n = centroids.size();
  std::vector<Moments> cells(n);
  Moments below{};
  for (size_t c = 0; c < n; ++c) {
    const Moments upto = c + 1 < n ? moments.up_to(0.5 * (centroids[c] + centroids[c + 1])) : moments.total();
    cells[c] = upto - below;
    below = upto;
  }
  return cells;
}

int64_t level_count(int64_t dim, int level) { return dim >> level; }  // angles (or radii) of a level

const PolarQuantConfig& checked(PolarQuantConfig& config) {
  const detail::ArgCheck check("polarquant");
  if (config.head_dim < 2 || config.head_dim > 4096) {
    check.fail("config.head_dim", "D in [2, 4096]", std::to_string(config.head_dim));
  }
  if (config.bits.empty()) config.bits = polarquant_default_bits(config.head_dim);
  const int levels = int(config.bits.size());
  if (levels > kMaxLevels) {
    check.fail("config.bits", fmt::format("1 to {} levels", kMaxLevels), fmt::format("{} levels", levels));
  }
  for (size_t l = 0; l < config.bits.size(); ++l) {
    if (config.bits[l] < 1 || config.bits[l] > 4) {
      check.fail(fmt::format("config.bits[{}]", l), "1, 2, 3 or 4", std::to_string(config.bits[l]));
    }
  }
  if (config.head_dim % (int64_t{1} << levels) != 0) {
    check.fail("config.head_dim",
               fmt::format("a multiple of 2^L = {} (L = {} levels, one per entry of config.bits)", int64_t{1} << levels, levels),
               std::to_string(config.head_dim));
  }
  return config;
}

void check_sizes(const detail::ArgCheck& check, int64_t head_dim, size_t x_size, int64_t record_bytes, size_t record_size) {
  if (int64_t(x_size) != head_dim) check.fail("x", fmt::format("{} values (head_dim)", head_dim), std::to_string(x_size));
  if (int64_t(record_size) != record_bytes) {
    check.fail("record", fmt::format("{} bytes (record_bytes())", record_bytes), fmt::format("{} bytes", record_size));
  }
}

void check_levels(const detail::ArgCheck& check, int64_t dim, int levels) {
  if (levels < 1 || levels > kMaxLevels) check.fail("levels", fmt::format("1 to {}", kMaxLevels), std::to_string(levels));
  if (dim < 2 || dim % (int64_t{1} << levels) != 0) {
    check.fail("y", fmt::format("a positive multiple of 2^levels = {} values", int64_t{1} << levels), std::to_string(dim));
  }
}

}  // namespace

double polar_angle_density(int level, double angle) {
  if (level < 1 || level > kMaxLevels) fail("polar_angle_density", "level", fmt::format("1 to {}", kMaxLevels), std::to_string(level));
  if (level == 1) return angle >= 0.0 && angle <= 2.0 * kPi ? 1.0 / (2.0 * kPi) : 0.0;
  if (angle < 0.0 || angle > kPi / 2.0) return 0.0;
  // Gamma(k) / (2^(k-2) Gamma(k/2)^2) sin^(k-1)(2 psi), in logs so that k = 2048 does not overflow.
  const double k = std::ldexp(1.0, level - 1);
  const double log_norm = std::lgamma(k) - (k - 2.0) * std::log(2.0) - 2.0 * std::lgamma(k / 2.0);
  const double s = std::sin(2.0 * angle);
  return s <= 0.0 ? 0.0 : std::exp(log_norm + (k - 1.0) * std::log(s));
}

double PolarAngleCodebook::lower() const { return 0.0; }
double PolarAngleCodebook::upper() const { return level_ == 1 ? 2.0 * kPi : kPi / 2.0; }

PolarAngleCodebook PolarAngleCodebook::lloyd_max(int level, int bits) {
  if (level < 1 || level > kMaxLevels) {
    fail("polar_angle_codebook", "level", fmt::format("1 to {}", kMaxLevels), std::to_string(level));
  }
  if (bits < 1 || bits > 4) fail("polar_angle_codebook", "bits", "1, 2, 3 or 4", std::to_string(bits));
  const AngleMoments moments(level);
  const size_t n = size_t(1) << bits;

  // Start evenly over the middle of the mass (all of the range at levels 1 and 2): no cell starts
  // empty. f_l is log-concave on its range (a power of sin(2 psi)), so Lloyd-Max has one fixed
  // point (Fleischer 1964) and the start only sets the number of iterations. At level 1 the even
  // start is already the fixed point.
  const double width = level == 1 ? moments.spread() : std::min(moments.spread(), 5.0 / (2.0 * std::sqrt(std::ldexp(1.0, level - 1))));
  std::vector<double> centroids(n);
  for (size_t c = 0; c < n; ++c) centroids[c] = moments.middle() + width * (double(2 * c + 1) / double(2 * n) - 0.5);

  constexpr int kMaxIterations = 100000;
  const double tolerance = 1e-14 * width;
  bool converged = false;
  for (int iteration = 0; iteration < kMaxIterations && !converged; ++iteration) {
    const std::vector<Moments> cells = cell_moments(moments, centroids);
    double largest_move = 0.0;
    for (size_t c = 0; c < n; ++c) {
      const double mean = cells[c].m1 / cells[c].m0;
      largest_move = std::max(largest_move, std::fabs(mean - centroids[c]));
      centroids[c] = mean;
    }
    converged = largest_move <= tolerance;
  }
  if (!converged) {
    fail("polar_angle_codebook", fmt::format("no convergence in {} iterations for level {}, bits = {}", kMaxIterations, level, bits));
  }

  PolarAngleCodebook book(level, bits);
  book.centroids_ = centroids;
  for (size_t c = 0; c + 1 < n; ++c) book.boundaries_.push_back(0.5 * (centroids[c] + centroids[c + 1]));
  const std::vector<Moments> cells = cell_moments(moments, centroids);
  double error = 0.0, agreement = 0.0;
  for (size_t k = 0; k < n; ++k) {
    const double c = centroids[k];
    error += cells[k].m2 - 2.0 * c * cells[k].m1 + c * c * cells[k].m0;
    agreement += std::cos(c) * cells[k].cos + std::sin(c) * cells[k].sin;  // cos(psi - c)
  }
  book.distortion_ = error / moments.total().m0;
  book.mean_cosine_ = agreement / moments.total().m0;
  return book;
}

uint8_t PolarAngleCodebook::index_of(double angle) const {
  return uint8_t(std::upper_bound(boundaries_.begin(), boundaries_.end(), angle) - boundaries_.begin());
}

std::vector<int> polarquant_default_bits(int64_t head_dim) {
  if (head_dim < 2 || head_dim > 4096 || head_dim % 2 != 0) {
    fail("polarquant", "head_dim", "an even D in [2, 4096] (at least one level)", std::to_string(head_dim));
  }
  const int levels = std::min(kMaxLevels, std::countr_zero(uint64_t(head_dim)));
  std::vector<int> bits(size_t(levels), 2);
  bits[0] = 4;
  return bits;
}

void polar_transform(std::span<const double> y, int levels, std::vector<double>& radii, std::vector<double>& angles) {
  const detail::ArgCheck check("polar_transform");
  const int64_t d = int64_t(y.size());
  check_levels(check, d, levels);
  radii.assign(y.begin(), y.end());
  angles.clear();
  for (int l = 1; l <= levels; ++l) {
    const int64_t n = level_count(d, l);
    std::vector<double> next(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const double a = radii[size_t(2 * i)], b = radii[size_t(2 * i + 1)];
      double angle = std::atan2(b, a);  // level 1: (-pi, pi]; above, a, b >= 0: [0, pi/2]
      if (angle < 0.0) angle += 2.0 * kPi;
      if (angle >= 2.0 * kPi) angle = 0.0;  // -1e-300 + 2 pi rounds to 2 pi, which is angle 0
      angles.push_back(angle);
      next[size_t(i)] = std::hypot(a, b);
    }
    radii = std::move(next);
  }
}

void polar_inverse(std::span<const double> radii, std::span<const double> angles, int levels, std::span<double> y) {
  const detail::ArgCheck check("polar_inverse");
  const int64_t d = int64_t(y.size());
  check_levels(check, d, levels);
  if (int64_t(radii.size()) != level_count(d, levels)) {
    check.fail("radii", fmt::format("{} values (D / 2^levels)", level_count(d, levels)), std::to_string(radii.size()));
  }
  if (int64_t(angles.size()) != d - level_count(d, levels)) {
    check.fail("angles", fmt::format("{} values (D - D / 2^levels)", d - level_count(d, levels)), std::to_string(angles.size()));
  }
  std::vector<double> current(radii.begin(), radii.end());
  // Level l's angles start after those of levels 1 .. l-1: D - D / 2^(l-1) of them.
  for (int l = levels; l >= 1; --l) {
    const int64_t n = level_count(d, l);
    const size_t first = size_t(d - level_count(d, l - 1));
    std::vector<double> children(static_cast<size_t>(2 * n));
    for (int64_t i = 0; i < n; ++i) {
      const double angle = angles[first + size_t(i)];
      children[size_t(2 * i)] = current[size_t(i)] * std::cos(angle);
      children[size_t(2 * i + 1)] = current[size_t(i)] * std::sin(angle);
    }
    current = std::move(children);
  }
  std::copy(current.begin(), current.end(), y.begin());
}

PolarQuant::PolarQuant(const PolarQuantConfig& config)
    : config_(config),
      rotation_(Rotation::make(config.rotation, checked(config_).head_dim, config.seed)) {
  for (int l = 1; l <= levels(); ++l) codebooks_.push_back(PolarAngleCodebook::lloyd_max(l, config_.bits[size_t(l - 1)]));
}

const PolarAngleCodebook& PolarQuant::codebook(int level) const {
  if (level < 1 || level > levels()) fail("polarquant.codebook", "level", fmt::format("1 to {}", levels()), std::to_string(level));
  return codebooks_[size_t(level - 1)];
}

int64_t PolarQuant::record_bytes() const {
  const int64_t d = config_.head_dim;
  int64_t bytes = detail::kNormBytes * level_count(d, levels());
  for (int l = 1; l <= levels(); ++l) bytes += packed_bytes(level_count(d, l), config_.bits[size_t(l - 1)]);
  return bytes;
}

double PolarQuant::expected_distortion() const {
  double agreement = 1.0;
  for (const PolarAngleCodebook& book : codebooks_) agreement *= book.mean_cosine();
  return 2.0 * (1.0 - agreement);
}

void PolarQuant::encode(std::span<const float> x, std::span<uint8_t> record) const {
  const detail::ArgCheck check("polarquant.encode");
  const int64_t d = config_.head_dim;
  check_sizes(check, d, x.size(), record_bytes(), record.size());
  detail::checked_norm(check, x, "x");  // the top radii are at most the norm: they fit in f32

  std::vector<double> y(x.begin(), x.end());
  rotation_.apply(y, y);
  std::vector<double> radii, angles;
  polar_transform(y, levels(), radii, angles);

  uint8_t* out = record.data();
  for (double r : radii) {
    detail::store_f32_le(out, float(r));
    out += detail::kNormBytes;
  }
  size_t first = 0;
  for (int l = 1; l <= levels(); ++l) {
    const PolarAngleCodebook& book = codebooks_[size_t(l - 1)];
    const size_t n = size_t(level_count(d, l));
    std::vector<uint8_t> indices(n);
    for (size_t i = 0; i < n; ++i) indices[i] = book.index_of(angles[first + i]);
    const int64_t bytes = packed_bytes(int64_t(n), book.bits());
    pack_bits(indices, book.bits(), std::span<uint8_t>(out, size_t(bytes)));
    out += bytes;
    first += n;
  }
}

void PolarQuant::decode(std::span<const uint8_t> record, std::span<float> x) const {
  const detail::ArgCheck check("polarquant.decode");
  const int64_t d = config_.head_dim;
  check_sizes(check, d, x.size(), record_bytes(), record.size());

  const uint8_t* in = record.data();
  std::vector<double> radii(static_cast<size_t>(level_count(d, levels())));
  for (size_t i = 0; i < radii.size(); ++i) {
    const float r = detail::load_f32_le(in);
    if (!detail::is_valid_norm(r)) detail::fail_record_norm(check, fmt::format("record radius[{}]", i), r);
    radii[i] = r;
    in += detail::kNormBytes;
  }
  std::vector<double> angles;
  for (int l = 1; l <= levels(); ++l) {
    const PolarAngleCodebook& book = codebooks_[size_t(l - 1)];
    const size_t n = size_t(level_count(d, l));
    std::vector<uint8_t> indices(n);
    const int64_t bytes = packed_bytes(int64_t(n), book.bits());
    unpack_bits(std::span<const uint8_t>(in, size_t(bytes)), book.bits(), indices);
    for (uint8_t index : indices) angles.push_back(book.centroids()[index]);
    in += bytes;
  }
  std::vector<double> y(static_cast<size_t>(d));
  polar_inverse(radii, angles, levels(), y);
  rotation_.apply_inverse(y, y);
  for (size_t j = 0; j < x.size(); ++j) x[j] = float(y[j]);
}

}  // namespace decodelab::kvquant
