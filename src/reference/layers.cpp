// Reference RMSNorm, residual add, bias add, RMSNorm + residual, SwiGLU and RoPE.
// RMSNorm: Zhang & Sennrich 2019. RoPE: Su et al. 2021 ("RoFormer"), with Llama 3's frequency
// scaling. SwiGLU: Shazeer 2020.
#include <cmath>

#include "reference/elements.h"
#include "reference/reference.h"

namespace decodelab::reference {
namespace {

// One row of RMSNorm from values already in double.
void normalize_row(const double* row, int64_t hidden, const Tensor& weight, double eps,
                   const Tensor& out, int64_t out_offset) {
  double sum_squares = 0.0;
  for (int64_t i = 0; i < hidden; ++i) sum_squares += row[i] * row[i];
  const double inv_rms = 1.0 / std::sqrt(sum_squares / double(hidden) + eps);
  for (int64_t i = 0; i < hidden; ++i) store(out, out_offset + i, row[i] * inv_rms * load(weight, i));
}

}  // namespace

// Rotates the first rotary_dim features of one head in place.
void rotate_head(double* head, int64_t position, const RopeParams& params) {
  const int half = params.rotary_dim / 2;
  for (int i = 0; i < half; ++i) {
    const double angle = double(position) * rope_inv_frequency(params, params.rotary_dim, i);
    const double c = std::cos(angle), s = std::sin(angle);
    const int a = params.style == RopeStyle::half_split ? i : 2 * i;
    const int b = params.style == RopeStyle::half_split ? i + half : 2 * i + 1;
    const double xa = head[a], xb = head[b];
    head[a] = xa * c - xb * s;
    head[b] = xb * c + xa * s;
  }
}

void rms_norm(const RmsNormArgs& a) {
  const int64_t hidden = a.x.dim(a.x.rank - 1);
  const int64_t rows = a.x.numel() / hidden;
  std::vector<double> row(static_cast<size_t>(hidden));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < hidden; ++i) row[size_t(i)] = load(a.x, r * hidden + i);
    normalize_row(row.data(), hidden, a.weight, a.eps, a.out, r * hidden);
  }
}

void residual_add(const ResidualAddArgs& a) {
  for (int64_t i = 0; i < a.out.numel(); ++i) store(a.out, i, load(a.a, i) + load(a.b, i));
}

// Element by element, so that out may alias x.
void bias_add(const BiasAddArgs& a) {
  const int64_t n = a.bias.numel();
  for (int64_t i = 0; i < a.out.numel(); ++i) store(a.out, i, load(a.x, i) + load(a.bias, i % n));
}

void rms_norm_residual(const RmsNormResidualArgs& a) {
  const int64_t hidden = a.x.dim(a.x.rank - 1);
  const int64_t rows = a.x.numel() / hidden;
  std::vector<double> row(static_cast<size_t>(hidden));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < hidden; ++i) {
      const int64_t at = r * hidden + i;
      // The norm reads the sum as stored, so that it agrees with the residual stream.
      row[size_t(i)] = round_to(a.residual.dtype, load(a.x, at) + load(a.residual, at));
      store(a.residual, at, row[size_t(i)]);
    }
    normalize_row(row.data(), hidden, a.weight, a.eps, a.out, r * hidden);
  }
}

void swiglu(const SwigluArgs& a) {
  for (int64_t i = 0; i < a.out.numel(); ++i) {
    const double g = load(a.gate, i);
    store(a.out, i, g / (1.0 + std::exp(-g)) * load(a.up, i));
  }
}

void rope(const RopeArgs& a) {
  const int64_t d = a.x.dim(a.x.rank - 1);
  const int64_t heads = a.x.dim(a.x.rank - 2);
  const int64_t tokens = a.x.numel() / (heads * d);
  std::vector<double> head(static_cast<size_t>(d));
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t position = load_index(a.positions, t);
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t base = (t * heads + h) * d;
      for (int64_t i = 0; i < d; ++i) head[size_t(i)] = load(a.x, base + i);
      rotate_head(head.data(), position, a.params);
      for (int64_t i = 0; i < d; ++i) store(a.out, base + i, head[size_t(i)]);
    }
  }
}

}  // namespace decodelab::reference
