// Gauss-Legendre quadrature for the codebook generators (the coordinate codebook of codebook.cpp,
// PolarQuant's angle codebooks of polarquant.cpp): the nodes and weights of a 16-point rule on
// [-1, 1], computed. Internal to src/kvquant.
#pragma once

#include <array>
#include <cmath>
#include <numbers>

namespace decodelab::detail {

inline constexpr int kGaussPoints = 16;

struct GaussLegendre {
  std::array<double, kGaussPoints> nodes{};    // on [-1, 1]
  std::array<double, kGaussPoints> weights{};
};

// Nodes are the roots of the Legendre polynomial P_n, found by Newton's method from the usual
// cosine guesses; weights 2 / ((1 - x^2) P_n'(x)^2).
inline GaussLegendre gauss_legendre() {
  const int n = kGaussPoints;
  GaussLegendre rule;
  for (int i = 0; i < n / 2; ++i) {
    double x = std::cos(std::numbers::pi * (i + 0.75) / (n + 0.5));
    double derivative = 0.0;
    for (int iteration = 0; iteration < 100; ++iteration) {
      double p = 1.0, p_previous = 0.0;  // P_k(x), P_{k-1}(x)
      for (int k = 0; k < n; ++k) {
        const double p_next = ((2 * k + 1) * x * p - k * p_previous) / (k + 1);
        p_previous = p;
        p = p_next;
      }
      derivative = n * (x * p - p_previous) / (x * x - 1.0);
      const double step = p / derivative;
      x -= step;
      if (std::fabs(step) < 1e-16) break;
    }
    const double weight = 2.0 / ((1.0 - x * x) * derivative * derivative);
    rule.nodes[size_t(i)] = -x;
    rule.nodes[size_t(n - 1 - i)] = x;
    rule.weights[size_t(i)] = rule.weights[size_t(n - 1 - i)] = weight;
  }
  return rule;
}

}  // namespace decodelab::detail
