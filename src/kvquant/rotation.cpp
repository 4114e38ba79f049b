// Seeded orthogonal rotations for KV-cache quantization: a dense Haar-random matrix (the
// reference) and a two-round randomized Hadamard transform (the fast path). See
// include/decodelab/kvquant.h for what each computes.
#include <fmt/format.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "decodelab/error.h"
#include "decodelab/kvquant.h"
#include "kvquant/seeded_stream.h"

namespace decodelab::kvquant {
namespace {

using detail::SeededStream;

// Q of the QR decomposition of a D x D Gaussian matrix, by Gram-Schmidt on its columns. Gram-
// Schmidt makes R's diagonal (each column's remaining norm) positive, the sign choice under which
// Q is Haar-distributed, so no sign fix is needed (Householder QR would need one). Each column is
// orthogonalized twice: one pass loses orthogonality in proportion to the condition number of
// the Gaussian matrix (hundreds at D = 256); a second pass brings it to rounding level.
std::vector<double> haar_matrix(int64_t d, uint64_t seed) {
  SeededStream stream(seed);
  const size_t n = size_t(d);
  std::vector<double> g(n * n);  // row-major; column j is g[i * n + j]
  for (double& v : g) v = stream.normal();
  std::vector<double> q(n * n);
  std::vector<double> column(n);
  for (size_t j = 0; j < n; ++j) {
    for (size_t i = 0; i < n; ++i) column[i] = g[i * n + j];
    for (int pass = 0; pass < 2; ++pass) {
      for (size_t k = 0; k < j; ++k) {
        double dot = 0.0;
        for (size_t i = 0; i < n; ++i) dot += q[i * n + k] * column[i];
        for (size_t i = 0; i < n; ++i) column[i] -= dot * q[i * n + k];
      }
    }
    double norm = 0.0;
    for (double v : column) norm += v * v;
    norm = std::sqrt(norm);
    for (size_t i = 0; i < n; ++i) q[i * n + j] = column[i] / norm;
  }
  return q;
}

// The powers of two that sum to d, largest first: its binary digits.
std::vector<int64_t> power_of_two_blocks(int64_t d) {
  std::vector<int64_t> blocks;
  for (int64_t b = int64_t{1} << 62; b > 0; b >>= 1) {
    if (d & b) blocks.push_back(b);
  }
  return blocks;
}

// In-place normalized Walsh-Hadamard transform of one block of n = 2^k values: butterflies
// (a, b) -> (a + b, a - b) over strides 1, 2, 4, ..., then 1/sqrt(n). The normalized Sylvester
// matrix is symmetric and orthogonal, so it is its own inverse.
void walsh_hadamard(std::span<double> v) {
  const size_t n = v.size();
  for (size_t half = 1; half < n; half *= 2) {
    for (size_t start = 0; start < n; start += 2 * half) {
      for (size_t i = start; i < start + half; ++i) {
        const double a = v[i], b = v[i + half];
        v[i] = a + b;
        v[i + half] = a - b;
      }
    }
  }
  const double scale = 1.0 / std::sqrt(double(n));
  for (double& x : v) x *= scale;
}

void check_spans(std::string_view op, int64_t d, size_t in, std::string_view in_name, size_t out,
                 std::string_view out_name) {
  if (int64_t(in) != d) fail(op, in_name, fmt::format("{} values (the rotation's D)", d), std::to_string(in));
  if (int64_t(out) != d) fail(op, out_name, fmt::format("{} values (the rotation's D)", d), std::to_string(out));
}

}  // namespace

std::string_view rotation_kind_name(RotationKind kind) {
  switch (kind) {
    case RotationKind::dense: return "dense";
    case RotationKind::hadamard: return "hadamard";
  }
  return "?";
}

Rotation Rotation::make(RotationKind kind, int64_t dim, uint64_t seed) {
  Rotation r(kind, dim, seed);
  if (kind == RotationKind::dense) {
    // 4096^2 doubles is 128 MiB: beyond that a dense reference is not what anyone wants.
    if (dim < 2 || dim > 4096) fail("rotation", "dim", "D in [2, 4096] for a dense rotation", std::to_string(dim));
    r.matrix_ = haar_matrix(dim, seed);
    return r;
  }
  if (dim < 16 || dim % 16 != 0) {
    fail("rotation", "dim", "D a positive multiple of 16 for a hadamard rotation", std::to_string(dim));
  }
  SeededStream stream(seed);
  r.blocks_ = power_of_two_blocks(dim);
  r.signs1_.resize(size_t(dim));
  for (double& s : r.signs1_) s = stream.sign();
  // Fisher-Yates: every permutation equally likely.
  r.permutation_.resize(size_t(dim));
  for (int64_t i = 0; i < dim; ++i) r.permutation_[size_t(i)] = i;
  for (int64_t i = dim - 1; i > 0; --i) {
    std::swap(r.permutation_[size_t(i)], r.permutation_[stream.below(uint64_t(i) + 1)]);
  }
  r.signs2_.resize(size_t(dim));
  for (double& s : r.signs2_) s = stream.sign();
  return r;
}

void Rotation::hadamard_blocks(std::span<double> v) const {
  size_t start = 0;
  for (int64_t b : blocks_) {
    walsh_hadamard(v.subspan(start, size_t(b)));
    start += size_t(b);
  }
}

void Rotation::apply(std::span<const double> x, std::span<double> y) const {
  check_spans("rotation.apply", dim_, x.size(), "x", y.size(), "y");
  const size_t n = size_t(dim_);
  std::vector<double> v(x.begin(), x.end());  // a copy, so that y may be x
  if (kind_ == RotationKind::dense) {
    for (size_t i = 0; i < n; ++i) {
      double sum = 0.0;
      for (size_t j = 0; j < n; ++j) sum += matrix_[i * n + j] * v[j];
      y[i] = sum;
    }
    return;
  }
  // y = B S2 P B S1 x, right to left.
  for (size_t i = 0; i < n; ++i) v[i] *= signs1_[i];
  hadamard_blocks(v);
  for (size_t i = 0; i < n; ++i) y[i] = v[size_t(permutation_[i])] * signs2_[i];
  hadamard_blocks(y);
}

void Rotation::apply_inverse(std::span<const double> y, std::span<double> x) const {
  check_spans("rotation.apply_inverse", dim_, y.size(), "y", x.size(), "x");
  const size_t n = size_t(dim_);
  std::vector<double> v(y.begin(), y.end());
  if (kind_ == RotationKind::dense) {
    for (size_t j = 0; j < n; ++j) {
      double sum = 0.0;
      for (size_t i = 0; i < n; ++i) sum += matrix_[i * n + j] * v[i];
      x[j] = sum;
    }
    return;
  }
  // x = R^T y = S1 B P^T S2 B y (S and B are symmetric, P^T scatters where P gathered).
  hadamard_blocks(v);
  for (size_t i = 0; i < n; ++i) x[size_t(permutation_[i])] = v[i] * signs2_[i];
  hadamard_blocks(x);
  for (size_t i = 0; i < n; ++i) x[i] *= signs1_[i];
}

}  // namespace decodelab::kvquant
