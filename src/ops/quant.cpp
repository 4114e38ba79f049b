// Quantized-weight layouts, and validation and routing of quantize, dequantize and the matvecs.
#include <fmt/format.h>

#include <cmath>

#include "decodelab/quant.h"
#include "ops/common.h"
#include "router/registry.h"

namespace decodelab {

using detail::ArgCheck;
using detail::kAny;

namespace {

void check_spec(const ArgCheck& c, const QuantSpec& spec, int64_t cols) {
  if (spec.format == QuantFormat::mlx_affine) {
    if (spec.bits != 4 && spec.bits != 8) c.fail("spec.bits", "4 or 8", std::to_string(spec.bits));
    if (spec.group_size != 32 && spec.group_size != 64 && spec.group_size != 128) {
      c.fail("spec.group_size", "32, 64 or 128", std::to_string(spec.group_size));
    }
  } else {
    const int bits = spec.format == QuantFormat::gguf_q4_0 ? 4 : 8;
    if (spec.bits != bits || spec.group_size != kGgufBlockSize) {
      c.fail("spec", fmt::format("{} with bits {} and group_size 32", quant_format_name(spec.format), bits),
             fmt::format("bits {}, group_size {}", spec.bits, spec.group_size));
    }
  }
  if (cols < 1 || cols % spec.group_size != 0) {
    c.fail("cols", fmt::format("a positive multiple of the group size {}", spec.group_size), std::to_string(cols));
  }
}

// The packed tensor's dtype and per-row width for a spec.
DType packed_dtype(const QuantSpec& spec) { return spec.format == QuantFormat::mlx_affine ? DType::u32 : DType::u8; }

int64_t packed_width(const QuantSpec& spec, int64_t cols) {
  if (spec.format == QuantFormat::mlx_affine) return cols * spec.bits / 32;
  return cols / kGgufBlockSize * gguf_block_bytes(spec.format);
}

void check_quantized(const ArgCheck& c, const QuantizedWeight& w, const char* name, Device device) {
  const std::string n(name);
  check_spec(c, w.spec, w.cols);
  if (w.rows < 1) c.fail(n + ".rows", "rows >= 1", std::to_string(w.rows));
  c.shape(w.packed, n + ".packed", {w.rows, packed_width(w.spec, w.cols)}, "[rows, packed width]");
  c.dtype(w.packed, n + ".packed", packed_dtype(w.spec));
  c.usable(w.packed, n + ".packed", device);
  if (w.spec.format != QuantFormat::mlx_affine) return;
  const int64_t groups = w.cols / w.spec.group_size;
  c.shape(w.scales, n + ".scales", {w.rows, groups}, "[rows, cols / group_size]");
  c.activation(w.scales, n + ".scales");
  c.usable(w.scales, n + ".scales", device);
  c.same_shape(w.biases, n + ".biases", w.scales, n + ".scales");
  c.same_dtype(w.biases, n + ".biases", w.scales.dtype, "the dtype of the scales");
  c.usable(w.biases, n + ".biases", device);
}

// x = [B, K] activations with B >= 1.
void check_input(const ArgCheck& c, const Tensor& x, const char* name) {
  c.shape(x, name, {kAny, kAny}, "[B, K]");
  c.activation(x, name);
  c.usable(x, name, x.device);
  if (x.dim(0) < 1 || x.dim(1) < 1) c.fail(name, "B >= 1 and K >= 1", x.describe());
}

void check_output(const ArgCheck& c, const Tensor& y, const char* name, const Tensor& x, int64_t n) {
  c.shape(y, name, {x.dim(0), n}, "[B, N]");
  c.same_dtype(y, name, x.dtype, "the dtype of x");
  c.usable(y, name, x.device);
}

}  // namespace

namespace detail {

void check_weight(const ArgCheck& c, const Weight& w, const char* name, int64_t cols, Device device) {
  if (w.is_quantized) {
    check_quantized(c, w.quantized, name, device);
  } else {
    c.shape(w.dense, name, {kAny, kAny}, "[N, K]");
    c.activation(w.dense, name);
    c.usable(w.dense, name, device);
    if (w.dense.dim(0) < 1) c.fail(name, "N >= 1", w.dense.describe());
  }
  if (w.cols() != cols) c.fail(name, fmt::format("K = {} input columns", cols), std::to_string(w.cols()) + " columns");
}

}  // namespace detail

using detail::check_weight;

std::string_view quant_format_name(QuantFormat f) {
  switch (f) {
    case QuantFormat::mlx_affine: return "mlx";
    case QuantFormat::gguf_q4_0: return "gguf.q4_0";
    case QuantFormat::gguf_q8_0: return "gguf.q8_0";
  }
  return "?";
}

std::string quant_spec_name(const QuantSpec& spec) {
  if (spec.format == QuantFormat::mlx_affine) return fmt::format("mlx.q{}.g{}", spec.bits, spec.group_size);
  return std::string(quant_format_name(spec.format));
}

QuantSpec parse_quant_spec(std::string_view name) {
  for (const QuantSpec& s : {QuantSpec::mlx(4, 32), QuantSpec::mlx(4, 64), QuantSpec::mlx(4, 128), QuantSpec::mlx(8, 32),
                             QuantSpec::mlx(8, 64), QuantSpec::mlx(8, 128), QuantSpec::q4_0(), QuantSpec::q8_0()}) {
    if (quant_spec_name(s) == name) return s;
  }
  fail("parse_quant_spec", "name", "mlx.q{4,8}.g{32,64,128}, gguf.q4_0 or gguf.q8_0", name);
}

QuantizedArray make_quantized(const QuantSpec& spec, int64_t rows, int64_t cols, DType scale_dtype, Device device) {
  const ArgCheck c("make_quantized");
  check_spec(c, spec, cols);
  if (rows < 1) c.fail("rows", "rows >= 1", std::to_string(rows));
  QuantizedArray q;
  q.packed = Array(packed_dtype(spec), {rows, packed_width(spec, cols)}, device);
  if (spec.format == QuantFormat::mlx_affine) {
    if (!is_float_activation(scale_dtype)) c.fail("scale_dtype", "f32, f16 or bf16", dtype_name(scale_dtype));
    q.scales = Array(scale_dtype, {rows, cols / spec.group_size}, device);
    q.biases = Array(scale_dtype, {rows, cols / spec.group_size}, device);
  }
  q.weight = QuantizedWeight{spec, rows, cols, q.packed.view(), q.scales.view(), q.biases.view()};
  return q;
}

int64_t quantized_row_bytes(const QuantSpec& spec, int64_t cols, DType scale_dtype) {
  const int64_t packed = packed_width(spec, cols) * int64_t(dtype_size(packed_dtype(spec)));
  if (spec.format != QuantFormat::mlx_affine) return packed;
  return packed + 2 * (cols / spec.group_size) * int64_t(dtype_size(scale_dtype));
}

void quantize(const Tensor& w, const QuantizedWeight& out, const RunOptions& run) {
  const ArgCheck c("quantize");
  c.shape(w, "w", {out.rows, out.cols}, "[rows, cols] matching out");
  c.activation(w, "w");
  c.usable(w, "w", w.device);
  check_quantized(c, out, "out", w.device);
  if (w.device == Device::cpu) {
    // The owners' quantizers turn non-finite or huge groups into NaN scales; refuse them here.
    for (int64_t i = 0; i < w.numel(); ++i) {
      const double v = (w.dtype == DType::f32) ? w.ptr<const float>()[i]
                       : (w.dtype == DType::f16) ? f16_to_f32(w.ptr<const uint16_t>()[i])
                                                 : bf16_to_f32(w.ptr<const uint16_t>()[i]);
      if (!std::isfinite(v) || std::fabs(v) > 1e30) {
        c.fail(fmt::format("w[{}, {}]", i / out.cols, i % out.cols), "a finite value of magnitude <= 1e30",
               fmt::format("{}", v));
      }
    }
  }
  dispatch(QuantizeArgs{w, out, run.stream}, run, w.device);
}

void dequantize(const QuantizedWeight& w, const Tensor& out, const RunOptions& run) {
  const ArgCheck c("dequantize");
  check_quantized(c, w, "w", out.device);
  c.shape(out, "out", {w.rows, w.cols}, "[rows, cols]");
  c.activation(out, "out");
  c.usable(out, "out", out.device);
  dispatch(DequantizeArgs{w, out, run.stream}, run, out.device);
}

void matvec(const Tensor& x, const Weight& w, const Tensor& y, const RunOptions& run) {
  const ArgCheck c("matvec");
  check_input(c, x, "x");
  check_weight(c, w, "w", x.dim(1), x.device);
  check_output(c, y, "y", x, w.rows());
  dispatch(MatvecArgs{x, w, y, run.stream}, run, x.device);
}

void matvec_multi(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y, const RunOptions& run) {
  const ArgCheck c("matvec_multi");
  check_input(c, x, "x");
  if (w.empty() || w.size() > size_t(kMaxMultiOutputs) || w.size() != y.size()) {
    c.fail("w, y", fmt::format("1 to {} weights and as many outputs", kMaxMultiOutputs),
           fmt::format("{} weights, {} outputs", w.size(), y.size()));
  }
  MatvecMultiArgs args{x, int(w.size()), {}, {}, run.stream};
  for (size_t i = 0; i < w.size(); ++i) {
    const std::string wn = fmt::format("w[{}]", i), yn = fmt::format("y[{}]", i);
    check_weight(c, w[i], wn.c_str(), x.dim(1), x.device);
    check_output(c, y[i], yn.c_str(), x, w[i].rows());
    args.w[i] = w[i];
    args.y[i] = y[i];
  }
  dispatch(args, run, x.device);
}

void qkv_projection(const Tensor& x, const Weight& wq, const Weight& wk, const Weight& wv, const Tensor& q,
                    const Tensor& k, const Tensor& v, const RunOptions& run) {
  const Weight w[] = {wq, wk, wv};
  const Tensor y[] = {q, k, v};
  matvec_multi(x, w, y, run);
}

void output_projection(const Tensor& attn, const Weight& wo, const Tensor& residual, const Tensor& out,
                       const RunOptions& run) {
  const ArgCheck c("output_projection");
  check_input(c, attn, "attn");
  check_weight(c, wo, "wo", attn.dim(1), attn.device);
  check_output(c, residual, "residual", attn, wo.rows());
  check_output(c, out, "out", attn, wo.rows());
  dispatch(OutputProjectionArgs{attn, wo, residual, out, run.stream}, run, attn.device);
}

void mlp_block(const Tensor& x, const Weight& gate, const Weight& up, const Weight& down, const Tensor& out,
               const RunOptions& run) {
  const ArgCheck c("mlp_block");
  check_input(c, x, "x");
  check_weight(c, gate, "gate", x.dim(1), x.device);
  check_weight(c, up, "up", x.dim(1), x.device);
  if (up.rows() != gate.rows()) c.fail("up", fmt::format("{} rows like gate", gate.rows()), std::to_string(up.rows()));
  check_weight(c, down, "down", gate.rows(), x.device);
  if (down.rows() != x.dim(1)) {
    c.fail("down", fmt::format("{} rows (the hidden size of x)", x.dim(1)), std::to_string(down.rows()));
  }
  check_output(c, out, "out", x, x.dim(1));
  dispatch(MlpBlockArgs{x, gate, up, down, out, run.stream}, run, x.device);
}

}  // namespace decodelab
