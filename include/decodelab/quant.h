// Quantized weights and the decode matvecs over them.
//
// Two formats, each bit-exact with its owner:
// - MLX affine (mlx.core.quantize): per row, groups of 32, 64 or 128 inputs share a scale and a
//   bias, w ~= scale * q + bias with q in [0, 2^bits), bits 4 or 8. q values are packed
//   little-endian into uint32 words (value j of a word in bits [j*bits, (j+1)*bits)).
//   packed: u32 [N, K*bits/32]; scales, biases: [N, K/group] in f32, f16 or bf16 (MLX uses the
//   dtype of w).
// - GGUF Q4_0 / Q8_0 (ggml, the gguf Python package): blocks of 32 inputs, packed: u8
//   [N, K/32 * block_bytes]. Q4_0 block (18 bytes): f16 scale d, then 16 bytes whose low nibble
//   holds element j and high nibble element j + 16, w = d * (q - 8). Q8_0 block (34 bytes): f16 d
//   then 32 int8 q, w = d * q. scales and biases are unused (empty). Where ggml's C quantizer and
//   the gguf package disagree (d of a zero block led by -0.0 is -0 in C, +0 in the package), we
//   follow the package.
// Weights are [N, K] (out x in) and y = W x.
#pragma once

#include <cstdint>
#include <span>

#include "decodelab/router.h"
#include "decodelab/tensor.h"

namespace decodelab {

enum class QuantFormat { mlx_affine, gguf_q4_0, gguf_q8_0 };

std::string_view quant_format_name(QuantFormat f);

struct QuantSpec {
  QuantFormat format = QuantFormat::mlx_affine;
  int bits = 4;         // mlx: 4 or 8; gguf: implied by the format
  int group_size = 64;  // mlx: 32, 64 or 128; gguf: 32
  static QuantSpec mlx(int bits, int group_size) { return {QuantFormat::mlx_affine, bits, group_size}; }
  static QuantSpec q4_0() { return {QuantFormat::gguf_q4_0, 4, 32}; }
  static QuantSpec q8_0() { return {QuantFormat::gguf_q8_0, 8, 32}; }
};

// Inputs per GGUF block, and bytes per block (the f16 scale and the packed codes).
inline constexpr int64_t kGgufBlockSize = 32;
constexpr int64_t gguf_block_bytes(QuantFormat f) { return f == QuantFormat::gguf_q4_0 ? 18 : 34; }

// "mlx.q4.g64", "gguf.q4_0", "gguf.q8_0".
std::string quant_spec_name(const QuantSpec& spec);
// The spec of such a name; an Error for any other.
QuantSpec parse_quant_spec(std::string_view name);

// A view of a quantized [rows, cols] matrix.
struct QuantizedWeight {
  QuantSpec spec;
  int64_t rows = 0;
  int64_t cols = 0;
  Tensor packed;
  Tensor scales;  // mlx only
  Tensor biases;  // mlx only
};

// Storage for a quantized matrix of the given spec; `scale_dtype` is used by MLX affine only.
struct QuantizedArray {
  Array packed;
  Array scales;
  Array biases;
  QuantizedWeight weight;
};
QuantizedArray make_quantized(const QuantSpec& spec, int64_t rows, int64_t cols,
                              DType scale_dtype = DType::f16, Device device = Device::cpu);

// Packed bytes per row, scales and biases included (what a matvec must read per output).
int64_t quantized_row_bytes(const QuantSpec& spec, int64_t cols, DType scale_dtype);

// w = [rows, cols] (f32, f16 or bf16) into `out`, made by make_quantized for the same shape.
void quantize(const Tensor& w, const QuantizedWeight& out, const RunOptions& run = {});
// The other way: out = [rows, cols].
void dequantize(const QuantizedWeight& w, const Tensor& out, const RunOptions& run = {});

// A weight matrix [N, K]: dense (f32, f16 or bf16) or quantized.
struct Weight {
  Tensor dense;
  QuantizedWeight quantized;
  bool is_quantized = false;

  static Weight of(const Tensor& dense) { return {dense, {}, false}; }
  static Weight of(const QuantizedWeight& q) { return {{}, q, true}; }
  int64_t rows() const { return is_quantized ? quantized.rows : dense.dim(0); }
  int64_t cols() const { return is_quantized ? quantized.cols : dense.dim(1); }
  Device device() const { return is_quantized ? quantized.packed.device : dense.device; }
};

// y = [B, N] with y[b] = W x[b], x = [B, K]. x and y share one dtype; a dense W may have another.
void matvec(const Tensor& x, const Weight& w, const Tensor& y, const RunOptions& run = {});

// Several matrices with the same K over one x in one pass: y[i] = W[i] x (Q, K, V or gate, up).
void matvec_multi(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y,
                  const RunOptions& run = {});

// The attention input projection: q, k, v = Wq x, Wk x, Wv x (matvec_multi over three weights).
void qkv_projection(const Tensor& x, const Weight& wq, const Weight& wk, const Weight& wv,
                    const Tensor& q, const Tensor& k, const Tensor& v, const RunOptions& run = {});

// The attention output projection with its residual: out = residual + Wo attn.
// attn = [B, K], residual, out = [B, N]; out may alias residual.
void output_projection(const Tensor& attn, const Weight& wo, const Tensor& residual,
                       const Tensor& out, const RunOptions& run = {});

// The MLP block: out = W_down (silu(W_gate x) * (W_up x)). x, out = [B, hidden].
void mlp_block(const Tensor& x, const Weight& gate, const Weight& up, const Weight& down,
               const Tensor& out, const RunOptions& run = {});

}  // namespace decodelab
