// Validation and routing of the layer ops (RMSNorm, residuals, biases, SwiGLU, RoPE).
#include <fmt/format.h>

#include <cmath>
#include <numbers>

#include "decodelab/layers.h"
#include "ops/common.h"
#include "router/registry.h"

namespace decodelab {

using detail::ArgCheck;
using detail::kAny;

namespace {

// x = [..., hidden] and an output of the same shape and dtype.
void check_rows(const ArgCheck& c, const Tensor& x, const char* x_name, const Tensor& out,
                const char* out_name) {
  c.rows_of(x, x_name, 1, kAny, "[..., n]");
  c.activation(x, x_name);
  c.usable(x, x_name, x.device);
  c.same_shape(out, out_name, x, x_name);
  c.same_dtype(out, out_name, x.dtype, fmt::format("the dtype of {}", x_name));
  c.usable(out, out_name, x.device);
  if (x.numel() == 0) c.fail(x_name, "a non-empty tensor", x.describe());
}

// A vector applied to every row of x (a norm weight, a bias): [n] with n the last dimension of x,
// in x's dtype, on x's device.
void check_row_vector(const ArgCheck& c, const Tensor& v, const char* name, const Tensor& x, const char* layout) {
  c.shape(v, name, {x.dim(x.rank - 1)}, layout);
  c.same_dtype(v, name, x.dtype, "the dtype of x");
  c.usable(v, name, x.device);
}

void check_norm_weight(const ArgCheck& c, const Tensor& weight, const Tensor& x, float eps) {
  check_row_vector(c, weight, "weight", x, "[hidden]");
  if (!(eps > 0.0f) || !std::isfinite(eps)) c.fail("eps", "a finite eps > 0", fmt::format("{}", eps));
}

}  // namespace

void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out, const RunOptions& run) {
  const ArgCheck c("rms_norm");
  check_rows(c, x, "x", out, "out");
  check_norm_weight(c, weight, x, eps);
  dispatch(RmsNormArgs{x, weight, out, eps, run.stream}, run, x.device);
}

void residual_add(const Tensor& a, const Tensor& b, const Tensor& out, const RunOptions& run) {
  const ArgCheck c("residual_add");
  check_rows(c, a, "a", out, "out");
  check_rows(c, a, "a", b, "b");
  dispatch(ResidualAddArgs{a, b, out, run.stream}, run, a.device);
}

void bias_add(const Tensor& x, const Tensor& bias, const Tensor& out, const RunOptions& run) {
  const ArgCheck c("bias_add");
  check_rows(c, x, "x", out, "out");
  check_row_vector(c, bias, "bias", x, "[N]");
  dispatch(BiasAddArgs{x, bias, out, run.stream}, run, x.device);
}

void rms_norm_residual(const Tensor& x, const Tensor& residual, const Tensor& weight, float eps,
                       const Tensor& out, const RunOptions& run) {
  const ArgCheck c("rms_norm_residual");
  check_rows(c, x, "x", out, "out");
  check_rows(c, x, "x", residual, "residual");
  check_norm_weight(c, weight, x, eps);
  dispatch(RmsNormResidualArgs{x, residual, weight, out, eps, run.stream}, run, x.device);
}

void swiglu(const Tensor& gate, const Tensor& up, const Tensor& out, const RunOptions& run) {
  const ArgCheck c("swiglu");
  check_rows(c, gate, "gate", out, "out");
  check_rows(c, gate, "gate", up, "up");
  dispatch(SwigluArgs{gate, up, out, run.stream}, run, gate.device);
}

void rope(const Tensor& x, const Tensor& positions, const RopeParams& params, const Tensor& out,
          const RunOptions& run) {
  const ArgCheck c("rope");
  check_rows(c, x, "x", out, "out");
  if (x.rank < 2) c.fail("x", "rank >= 2 [..., H, D]", x.describe());
  const int64_t d = x.dim(x.rank - 1);
  const int64_t tokens = x.numel() / (x.dim(x.rank - 2) * d);
  detail::check_positions(c, positions, tokens, x.device, run.check_indices, fmt::format(" of x {}", x.describe()));
  dispatch(RopeArgs{x, positions, out, detail::check_rope(c, params, d), run.stream}, run, x.device);
}

double rope_inv_frequency(const RopeParams& params, int rotary_dim, int pair) {
  const double inv_freq = std::pow(double(params.theta), -2.0 * pair / rotary_dim);
  if (!params.llama3_scaling) return inv_freq;
  // Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
  const Llama3Scaling& s = params.llama3;
  const double low_freq_wavelen = s.original_max_position / double(s.low_freq_factor);
  const double high_freq_wavelen = s.original_max_position / double(s.high_freq_factor);
  const double wavelen = 2.0 * std::numbers::pi / inv_freq;
  if (wavelen < high_freq_wavelen) return inv_freq;
  if (wavelen > low_freq_wavelen) return inv_freq / s.factor;
  const double smooth = (s.original_max_position / wavelen - s.low_freq_factor) /
                        (double(s.high_freq_factor) - s.low_freq_factor);
  return (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq;
}

}  // namespace decodelab
