// The Lloyd-Max codebook for one coordinate of a uniformly random unit vector in D dimensions,
// density f(x) proportional to (1 - x^2)^((D-3)/2) on [-1, 1] (TurboQuant, arXiv:2504.19874,
// Lemma 1 and eq. 4).
//
// Lloyd-Max (Lloyd 1957 / Max 1960) alternates the two conditions an MSE-optimal scalar quantizer
// meets: each boundary is the midpoint of its two centroids, each centroid the mean of f over its
// cell. The cell integrals are computed in theta, x = sin(theta), where f dx is proportional to
// cos^(D-2)(theta) dtheta: smooth everywhere for every D >= 3 (in x the density has a square-root
// edge at D = 4), so Gauss-Legendre quadrature converges fast.
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numbers>
#include <string>

#include "decodelab/error.h"
#include "decodelab/kvquant.h"
#include "kvquant/quadrature.h"

namespace decodelab::kvquant {
namespace {

using detail::GaussLegendre;
using detail::gauss_legendre;
using detail::kGaussPoints;

// Integrals of x^0, x^1, x^2 times the (unnormalized) density over an interval.
struct Moments {
  double m0 = 0.0, m1 = 0.0, m2 = 0.0;
  Moments operator-(const Moments& o) const { return {m0 - o.m0, m1 - o.m1, m2 - o.m2}; }
  Moments operator+(const Moments& o) const { return {m0 + o.m0, m1 + o.m1, m2 + o.m2}; }
};

// Moments of the coordinate density from -1 up to any point, from a table of cumulative
// moments at the edges of equal panels in theta plus one Gauss-Legendre panel for the rest.
class CoordinateMoments {
 public:
  explicit CoordinateMoments(int64_t dim) : power_(double(dim - 2)), rule_(gauss_legendre()) {
    // Beyond theta_max the density is below e^-100 of its peak: nothing to integrate. For large
    // D this keeps the panels narrow where the mass is (theta_max ~ 14 / sqrt(D)).
    theta_max_ = std::acos(std::exp(-100.0 / power_));
    panel_ = 2.0 * theta_max_ / kPanels;
    cumulative_[0] = {};
    for (int k = 0; k < kPanels; ++k) {
      cumulative_[size_t(k + 1)] = cumulative_[size_t(k)] + integrate(edge(k), edge(k + 1));
    }
  }

  // Moments over [-1, x].
  Moments up_to(double x) const {
    const double theta = std::clamp(std::asin(std::clamp(x, -1.0, 1.0)), -theta_max_, theta_max_);
    const int k = std::min(kPanels - 1, int((theta + theta_max_) / panel_));
    return cumulative_[size_t(k)] + integrate(edge(k), theta);
  }

  Moments total() const { return cumulative_[kPanels]; }

 private:
  // 512 panels: at large D each is about 0.05 / sqrt(D) wide, at D = 3 about pi / 512, and 16
  // points integrate cos^(D-2) times a quadratic in sin over that to rounding error.
  static constexpr int kPanels = 512;

  double edge(int k) const { return -theta_max_ + k * panel_; }

  Moments integrate(double a, double b) const {
    const double half = 0.5 * (b - a), mid = 0.5 * (a + b);
    Moments m;
    for (int i = 0; i < kGaussPoints; ++i) {
      const double theta = mid + half * rule_.nodes[size_t(i)];
      const double x = std::sin(theta);
      const double w = rule_.weights[size_t(i)] * half * std::pow(std::cos(theta), power_);
      m.m0 += w;
      m.m1 += w * x;
      m.m2 += w * x * x;
    }
    return m;
  }

  double power_;
  GaussLegendre rule_;
  double theta_max_ = 0.0;
  double panel_ = 0.0;
  std::array<Moments, kPanels + 1> cumulative_{};
};

// Moments of each cell: between -1, the midpoints of the centroids, and 1.
std::vector<Moments> cell_moments(const CoordinateMoments& moments, std::span<const double> centroids) {
  const size_t n = centroids.size();
  std::vector<Moments> cells(n);
  Moments below = moments.up_to(-1.0);
  for (size_t k = 0; k < n; ++k) {
    const Moments upto = k + 1 < n ? moments.up_to(0.5 * (centroids[k] + centroids[k + 1])) : moments.total();
    cells[k] = upto - below;
    below = upto;
  }
  return cells;
}

}  // namespace

Codebook Codebook::lloyd_max(int64_t dim, int bits) {
  if (dim < 3) fail("lloyd_max_codebook", "dim", "D >= 3", std::to_string(dim));
  if (bits < 1 || bits > 4) fail("lloyd_max_codebook", "bits", "1, 2, 3 or 4", std::to_string(bits));
  const CoordinateMoments moments(dim);
  const size_t n = size_t(1) << bits;
  const double sigma = 1.0 / std::sqrt(double(dim));

  // Start evenly spread over +-2.5 sigma (all of [-1, 1] when that is wider): inside the mass,
  // so no cell starts empty. Lloyd-Max never increases the distortion and, the density being
  // log-concave, has one fixed point (Fleischer 1964), so the start only sets the number of
  // iterations.
  const double spread = std::min(1.0, 2.5 * sigma);
  std::vector<double> centroids(n);
  for (size_t k = 0; k < n; ++k) centroids[k] = spread * (double(2 * k + 1) / double(n) - 1.0);

  // The centroids converge linearly; stop when no centroid moves by more than 1e-14 sigma, about
  // the rounding error of the quadrature.
  constexpr int kMaxIterations = 100000;
  bool converged = false;
  for (int iteration = 0; iteration < kMaxIterations && !converged; ++iteration) {
    const std::vector<Moments> cells = cell_moments(moments, centroids);
    double largest_move = 0.0;
    for (size_t k = 0; k < n; ++k) {
      const double mean = cells[k].m1 / cells[k].m0;
      largest_move = std::max(largest_move, std::fabs(mean - centroids[k]));
      centroids[k] = mean;
    }
    converged = largest_move <= 1e-14 * sigma;
  }
  if (!converged) {
    fail("lloyd_max_codebook",
         fmt::format("no convergence in {} iterations for D = {}, bits = {}", kMaxIterations, dim, bits));
  }

  Codebook book(dim, bits);
  book.centroids_ = centroids;
  for (size_t k = 0; k + 1 < n; ++k) book.boundaries_.push_back(0.5 * (centroids[k] + centroids[k + 1]));
  // E[(x - c)^2] over a cell is m2 - 2 c m1 + c^2 m0 (divided by the total mass).
  const std::vector<Moments> cells = cell_moments(moments, centroids);
  double error = 0.0;
  for (size_t k = 0; k < n; ++k) {
    const double c = centroids[k];
    error += cells[k].m2 - 2.0 * c * cells[k].m1 + c * c * cells[k].m0;
  }
  book.distortion_ = error / moments.total().m0;
  return book;
}

uint8_t Codebook::index_of(double x) const {
  // The number of boundaries <= x is the index of the cell holding x.
  return uint8_t(std::upper_bound(boundaries_.begin(), boundaries_.end(), x) - boundaries_.begin());
}

}  // namespace decodelab::kvquant
