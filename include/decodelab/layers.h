// Decode-layer pieces: RMSNorm, residuals, projection biases, RoPE, SwiGLU.
//
// Activations are row-major f32, f16 or bf16 with the last dimension contiguous; every tensor of
// one call has the same dtype. Arithmetic is f32 in optimized backends and double in the
// reference. Outputs may alias inputs where a function says so.
#pragma once

#include "decodelab/router.h"
#include "decodelab/tensor.h"

namespace decodelab {

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight, over rows of x = [..., hidden].
// weight: [hidden]. out: the shape of x; may alias x.
void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out,
              const RunOptions& run = {});

// out = a + b, all of one shape. out may alias a or b.
void residual_add(const Tensor& a, const Tensor& b, const Tensor& out, const RunOptions& run = {});

// out[r, :] = x[r, :] + bias, over rows of x = [..., N]: the biases of a projection's outputs
// (Qwen2's q/k/v projections; in the decode block x is [B, N]). bias: [N] in x's dtype. out: the
// shape of x; may alias x.
void bias_add(const Tensor& x, const Tensor& bias, const Tensor& out, const RunOptions& run = {});

// The pre-norm step of a decoder layer: residual <- x + residual; out = rms_norm(residual).
// x, residual, out: [..., hidden]; residual is read and written.
void rms_norm_residual(const Tensor& x, const Tensor& residual, const Tensor& weight, float eps,
                       const Tensor& out, const RunOptions& run = {});

// out = silu(gate) * up, with silu(g) = g / (1 + exp(-g)). All [..., intermediate].
void swiglu(const Tensor& gate, const Tensor& up, const Tensor& out, const RunOptions& run = {});

enum class RopeStyle {
  half_split,   // Hugging Face Llama "rotate_half": pairs (i, i + rotary_dim/2)
  interleaved,  // GPT-J / original: pairs (2i, 2i + 1)
};

// Llama 3's frequency scaling (the "llama3" rope_type of Hugging Face configs).
struct Llama3Scaling {
  float factor = 8.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int original_max_position = 8192;
};

struct RopeParams {
  float theta = 10000.0f;
  RopeStyle style = RopeStyle::half_split;
  int rotary_dim = 0;  // 0 = the whole head_dim; otherwise an even number <= head_dim
  bool llama3_scaling = false;
  Llama3Scaling llama3{};
};

// Rotates each head of x = [..., H, D] by its token's position: positions is i32 with one entry
// per token (the product of the leading dimensions of x). out: the shape of x; may alias x.
void rope(const Tensor& x, const Tensor& positions, const RopeParams& params, const Tensor& out,
          const RunOptions& run = {});

// The inverse frequency of rotary pair i (0 <= i < rotary_dim/2), with Llama 3 scaling applied
// when asked: the single definition every backend uses.
double rope_inv_frequency(const RopeParams& params, int rotary_dim, int pair);

}  // namespace decodelab
