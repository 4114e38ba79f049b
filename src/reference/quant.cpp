// Reference quantization (MLX affine, GGUF Q4_0/Q8_0), dequantization and the matvecs over dense
// and quantized weights.
//
// Quantize and dequantize must be bit-exact with their owners (mlx.core.quantize/dequantize and
// the gguf Python package), so unlike the rest of the reference they compute in f32 exactly as
// the owners do; each step below says which rounding it mirrors. The matvecs read the quantized
// weights as exact values (scale * q + bias in double) and accumulate in double.
#include <cmath>
#include <cstring>

#include "reference/elements.h"
#include "reference/reference.h"

namespace decodelab::reference {
namespace {

constexpr int kGgufBlock = int(kGgufBlockSize);

// f32 round trip through the scale dtype, as the owner's f16/bf16 arithmetic does.
float round_scale(DType dtype, float v) { return float(round_to(dtype, v)); }

void store_f16_le(uint8_t* dst, float v) {
  const uint16_t h = f32_to_f16(v);
  dst[0] = uint8_t(h & 0xFF);
  dst[1] = uint8_t(h >> 8);
}

float load_f16_le(const uint8_t* src) { return f16_to_f32(uint16_t(src[0] | (src[1] << 8))); }

// mlx.core.quantize, one group: the larger-magnitude edge becomes the bias so that it is exact,
// and the scale is negative when that edge is the maximum. All in f32 like MLX's CPU kernel.
void quantize_mlx_group(const float* w, int group, int bits, float& scale, float& bias, uint32_t* q) {
  const float n_bins = float((1 << bits) - 1);
  float w_max = -INFINITY, w_min = INFINITY;
  for (int i = 0; i < group; ++i) {
    w_max = std::max(w_max, w[i]);
    w_min = std::min(w_min, w[i]);
  }
  const bool min_is_edge = std::fabs(w_min) > std::fabs(w_max);
  scale = std::max((w_max - w_min) / n_bins, 1e-7f);
  scale = min_is_edge ? scale : -scale;
  const float edge = min_is_edge ? w_min : w_max;
  const float q0 = std::nearbyint(edge / scale);  // ties to even (default rounding mode)
  bias = 0.0f;
  if (q0 != 0.0f) {
    scale = edge / q0;
    bias = edge;
  }
  for (int i = 0; i < group; ++i) {
    const float v = std::nearbyint((w[i] - bias) / scale);
    q[i] = uint32_t(std::min(std::max(v, 0.0f), n_bins));
  }
}

void quantize_mlx(const Tensor& w, const QuantizedWeight& out, int64_t row_begin, int64_t row_end) {
  const int bits = out.spec.bits, group = out.spec.group_size;
  const int per_word = 32 / bits;
  const int64_t words_per_row = out.cols / per_word, groups_per_row = out.cols / group;
  std::vector<float> values(static_cast<size_t>(group));
  std::vector<uint32_t> q(static_cast<size_t>(group));
  for (int64_t r = row_begin; r < row_end; ++r) {
    uint32_t* words = out.packed.ptr<uint32_t>() + r * words_per_row;
    std::memset(words, 0, size_t(words_per_row) * 4);
    for (int64_t g = 0; g < groups_per_row; ++g) {
      const int64_t first = r * out.cols + g * group;
      for (int i = 0; i < group; ++i) values[size_t(i)] = float(load(w, first + i));
      float scale = 0.0f, bias = 0.0f;
      quantize_mlx_group(values.data(), group, bits, scale, bias, q.data());
      store(out.scales, r * groups_per_row + g, scale);
      store(out.biases, r * groups_per_row + g, bias);
      for (int i = 0; i < group; ++i) {
        const int64_t k = g * group + i;
        words[k / per_word] |= q[size_t(i)] << ((k % per_word) * bits);
      }
    }
  }
}

// The gguf package (and ggml's quantize_row_q4_0_ref): d = (signed value of largest magnitude) / -8,
// q = trunc(x / d + 8.5) clamped to 15, i.e. round half up. The largest magnitude is the first
// such element, as numpy's argmax picks it; ggml's C loop starts from +0 instead, which differs
// only in the sign of d for a block of zeros led by -0.0. We follow the package.
void quantize_q4_0_block(const float* x, uint8_t* block) {
  float max = x[0], amax = std::fabs(x[0]);
  for (int i = 1; i < kGgufBlock; ++i) {
    if (std::fabs(x[i]) > amax) {  // strict: the first index wins ties
      amax = std::fabs(x[i]);
      max = x[i];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_f16_le(block, d);
  for (int j = 0; j < kGgufBlock / 2; ++j) {
    const float lo = x[j] * id + 8.5f, hi = x[j + 16] * id + 8.5f;
    const uint8_t q_lo = uint8_t(std::min(15, int(lo))), q_hi = uint8_t(std::min(15, int(hi)));
    block[2 + j] = uint8_t(q_lo | (q_hi << 4));
  }
}

// ggml's quantize_row_q8_0_ref: d = amax / 127, q = round half away from zero of x / d.
void quantize_q8_0_block(const float* x, uint8_t* block) {
  float amax = 0.0f;
  for (int i = 0; i < kGgufBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_f16_le(block, d);
  for (int i = 0; i < kGgufBlock; ++i) block[2 + i] = uint8_t(int8_t(std::round(x[i] * id)));
}

void quantize_gguf(const Tensor& w, const QuantizedWeight& out, int64_t row_begin, int64_t row_end) {
  const int64_t block_bytes = gguf_block_bytes(out.spec.format);
  const int64_t blocks_per_row = out.cols / kGgufBlock;
  float x[kGgufBlock];
  for (int64_t r = row_begin; r < row_end; ++r) {
    for (int64_t blk = 0; blk < blocks_per_row; ++blk) {
      for (int i = 0; i < kGgufBlock; ++i) x[i] = float(load(w, r * out.cols + blk * kGgufBlock + i));
      uint8_t* block = out.packed.ptr<uint8_t>() + (r * blocks_per_row + blk) * block_bytes;
      if (out.spec.format == QuantFormat::gguf_q4_0) {
        quantize_q4_0_block(x, block);
      } else {
        quantize_q8_0_block(x, block);
      }
    }
  }
}

// The integer code of element (r, k) and, for MLX, its group's scale and bias.
struct Code {
  int q;
  float scale;
  float bias;
};

Code code_at(const QuantizedWeight& w, int64_t r, int64_t k) {
  if (w.spec.format == QuantFormat::mlx_affine) {
    const int per_word = 32 / w.spec.bits;
    const uint32_t word = w.packed.ptr<const uint32_t>()[r * (w.cols / per_word) + k / per_word];
    const int q = int((word >> ((k % per_word) * w.spec.bits)) & ((1u << w.spec.bits) - 1));
    const int64_t g = r * (w.cols / w.spec.group_size) + k / w.spec.group_size;
    return {q, float(load(w.scales, g)), float(load(w.biases, g))};
  }
  const int64_t block_bytes = gguf_block_bytes(w.spec.format);
  const uint8_t* block = w.packed.ptr<const uint8_t>() + (r * (w.cols / kGgufBlock) + k / kGgufBlock) * block_bytes;
  const float d = load_f16_le(block);
  const int i = int(k % kGgufBlock);
  if (w.spec.format == QuantFormat::gguf_q8_0) return {int(int8_t(block[2 + i])), d, 0.0f};
  const uint8_t byte = block[2 + i % 16];
  return {(i < 16 ? byte & 0xF : byte >> 4) - 8, d, 0.0f};
}

// Row r of a weight as exact values.
void weight_row(const Weight& w, int64_t r, std::vector<double>& row) {
  const int64_t cols = w.cols();
  row.resize(size_t(cols));
  for (int64_t k = 0; k < cols; ++k) {
    if (w.is_quantized) {
      const Code c = code_at(w.quantized, r, k);
      row[size_t(k)] = double(c.scale) * c.q + double(c.bias);
    } else {
      row[size_t(k)] = load(w.dense, r * cols + k);
    }
  }
}

// y[b] = W x[b] in double, handed to `emit(b, n, value)`.
template <class Emit>
void multiply(const Weight& w, const std::vector<double>& x, int64_t batch, Emit&& emit) {
  const int64_t rows = w.rows(), cols = w.cols();
  std::vector<double> row;
  for (int64_t n = 0; n < rows; ++n) {
    weight_row(w, n, row);
    for (int64_t b = 0; b < batch; ++b) {
      double dot = 0.0;
      for (int64_t k = 0; k < cols; ++k) dot += row[size_t(k)] * x[size_t(b * cols + k)];
      emit(b, n, dot);
    }
  }
}

void matvec_into(const Tensor& x, const Weight& w, const Tensor& y) {
  const int64_t rows = w.rows();
  multiply(w, load_all(x), x.dim(0), [&](int64_t b, int64_t n, double v) { store(y, b * rows + n, v); });
}

}  // namespace

void quantize_rows(const QuantizeArgs& a, int64_t row_begin, int64_t row_end) {
  if (a.out.spec.format == QuantFormat::mlx_affine) {
    quantize_mlx(a.w, a.out, row_begin, row_end);
  } else {
    quantize_gguf(a.w, a.out, row_begin, row_end);
  }
}

void dequantize_rows(const DequantizeArgs& a, int64_t row_begin, int64_t row_end) {
  const QuantizedWeight& w = a.w;
  for (int64_t r = row_begin; r < row_end; ++r) {
    for (int64_t k = 0; k < w.cols; ++k) {
      const Code c = code_at(w, r, k);
      float v;
      if (w.spec.format == QuantFormat::mlx_affine) {
        // mx.dequantize: q * scale, then + bias, each rounded to the scales' dtype.
        const DType t = w.scales.dtype;
        v = round_scale(t, round_scale(t, float(c.q) * c.scale) + c.bias);
      } else {
        v = c.scale * float(c.q);  // gguf: f32(d) * f32(q), one f32 product
      }
      store(a.out, r * w.cols + k, v);
    }
  }
}

void quantize(const QuantizeArgs& a) { quantize_rows(a, 0, a.out.rows); }
void dequantize(const DequantizeArgs& a) { dequantize_rows(a, 0, a.w.rows); }

void matvec(const MatvecArgs& a) { matvec_into(a.x, a.w, a.y); }

void matvec_multi(const MatvecMultiArgs& a) {
  for (int i = 0; i < a.count; ++i) matvec_into(a.x, a.w[size_t(i)], a.y[size_t(i)]);
}

void output_projection(const OutputProjectionArgs& a) {
  const int64_t rows = a.wo.rows();
  multiply(a.wo, load_all(a.attn), a.attn.dim(0), [&](int64_t b, int64_t n, double v) {
    store(a.out, b * rows + n, load(a.residual, b * rows + n) + v);
  });
}

void mlp_block(const MlpBlockArgs& a) {
  const int64_t batch = a.x.dim(0), inter = a.gate.rows();
  const std::vector<double> x = load_all(a.x);
  std::vector<double> gate(static_cast<size_t>(batch * inter)), act(static_cast<size_t>(batch * inter));
  multiply(a.gate, x, batch, [&](int64_t b, int64_t n, double v) { gate[size_t(b * inter + n)] = v; });
  multiply(a.up, x, batch, [&](int64_t b, int64_t n, double v) {
    const double g = gate[size_t(b * inter + n)];
    // The activation is stored between the two matvecs, so it is rounded to the output dtype.
    act[size_t(b * inter + n)] = round_to(a.out.dtype, g / (1.0 + std::exp(-g)) * v);
  });
  const int64_t hidden = a.down.rows();
  multiply(a.down, act, batch, [&](int64_t b, int64_t n, double v) { store(a.out, b * hidden + n, v); });
}

}  // namespace decodelab::reference
