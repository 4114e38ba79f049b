// The validated arguments of each op, as every backend's kernel receives them. One struct per op;
// `kOp` is the op's name in the registry, trust records and benchmarks.
#pragma once

#include <array>

#include "decodelab/attention.h"
#include "decodelab/kivi_cache.h"
#include "decodelab/kv_cache.h"
#include "decodelab/layers.h"
#include "decodelab/model.h"
#include "decodelab/quant.h"
#include "decodelab/qjl_cache.h"
#include "decodelab/rabitq_cache.h"
#include "decodelab/turboquant_cache.h"

namespace decodelab {

struct RmsNormArgs {
  static constexpr const char* kOp = "rms_norm";
  Tensor x, weight, out;
  float eps = 1e-5f;
  Stream stream;
};

struct ResidualAddArgs {
  static constexpr const char* kOp = "residual_add";
  Tensor a, b, out;
  Stream stream;
};

struct BiasAddArgs {
  static constexpr const char* kOp = "bias_add";
  Tensor x, bias, out;
  Stream stream;
};

struct RmsNormResidualArgs {
  static constexpr const char* kOp = "rms_norm_residual";
  Tensor x, residual, weight, out;
  float eps = 1e-5f;
  Stream stream;
};

struct SwigluArgs {
  static constexpr const char* kOp = "swiglu";
  Tensor gate, up, out;
  Stream stream;
};

struct RopeArgs {
  static constexpr const char* kOp = "rope";
  Tensor x, positions, out;
  RopeParams params;  // rotary_dim resolved (never 0)
  Stream stream;
};

struct KvAppendArgs {
  static constexpr const char* kOp = "kv_append";
  Tensor k_new, v_new;
  ContiguousKV cache;
  Stream stream;
};

struct KvAppendPagedArgs {
  static constexpr const char* kOp = "kv_append_paged";
  Tensor k_new, v_new;
  PagedKV cache;
  Stream stream;
};

struct QkvSplitArgs {
  static constexpr const char* kOp = "qkv_split";
  Tensor qkv, q, k, v;
  Stream stream;
};

struct QkvSplitRopeArgs {
  static constexpr const char* kOp = "qkv_split_rope";
  Tensor qkv, positions, q, k, v;
  RopeParams rope;  // rotary_dim resolved
  Stream stream;
};

struct QkvRopeAppendArgs {
  static constexpr const char* kOp = "qkv_rope_append";
  Tensor qkv, q_out;
  ContiguousKV cache;
  RopeParams rope;  // rotary_dim resolved
  Stream stream;
};

struct QkvRopeAppendPagedArgs {
  static constexpr const char* kOp = "qkv_rope_append_paged";
  Tensor qkv, q_out;
  PagedKV cache;
  RopeParams rope;  // rotary_dim resolved
  Stream stream;
};

struct PrefillAttentionArgs {
  static constexpr const char* kOp = "prefill_attention";
  Tensor q, k, v, out;
  AttentionOptions options;  // scale resolved (never 0)
  Stream stream;
};

struct DecodeAttentionArgs {
  static constexpr const char* kOp = "decode_attention";
  Tensor q;
  ContiguousKV cache;
  Tensor out;
  AttentionOptions options;  // scale resolved
  Stream stream;
};

struct DecodeAttentionPagedArgs {
  static constexpr const char* kOp = "decode_attention_paged";
  Tensor q;
  PagedKV cache;
  Tensor out;
  AttentionOptions options;  // scale resolved
  Stream stream;
};

struct TurboQuantAppendPagedArgs {
  static constexpr const char* kOp = "turboquant_append_paged";
  Tensor k_new, v_new;
  PagedTurboQuantKV cache;
  Stream stream;
};

struct TurboQuantDecodeAttentionPagedArgs {
  static constexpr const char* kOp = "turboquant_decode_attention_paged";
  Tensor q;
  PagedTurboQuantKV cache;
  Tensor out;
  AttentionOptions options;  // scale resolved
  Stream stream;
};

// k_new, v_new: [B, S, Hkv, D], or [B, Hkv, D] for one token (S = 1).
struct KiviAppendPagedArgs {
  static constexpr const char* kOp = "kivi_append_paged";
  Tensor k_new, v_new;
  PagedKiviKV cache;
  Stream stream;
};

struct KiviDecodeAttentionPagedArgs {
  static constexpr const char* kOp = "kivi_decode_attention_paged";
  Tensor q;
  PagedKiviKV cache;
  Tensor out;
  AttentionOptions options;  // scale resolved
  Stream stream;
};

// k_new, v_new: [B, S, Hkv, D], or [B, Hkv, D] for one token (S = 1).
struct RabitqAppendPagedArgs {
  static constexpr const char* kOp = "rabitq_append_paged";
  Tensor k_new, v_new;
  PagedRabitqKV cache;
  Stream stream;
};

struct RabitqDecodeAttentionPagedArgs {
  static constexpr const char* kOp = "rabitq_decode_attention_paged";
  Tensor q;
  PagedRabitqKV cache;
  Tensor out;
  AttentionOptions options;  // scale resolved
  Stream stream;
};

// k_new, v_new: [B, S, Hkv, D], or [B, Hkv, D] for one token (S = 1).
struct QjlAppendPagedArgs {
  static constexpr const char* kOp = "qjl_append_paged";
  Tensor k_new, v_new;
  PagedQjlKV cache;
  Stream stream;
};

struct QjlDecodeAttentionPagedArgs {
  static constexpr const char* kOp = "qjl_decode_attention_paged";
  Tensor q;
  PagedQjlKV cache;
  Tensor out;
  AttentionOptions options;  // scale resolved
  Stream stream;
};

struct QuantizeArgs {
  static constexpr const char* kOp = "quantize";
  Tensor w;
  QuantizedWeight out;
  Stream stream;
};

struct DequantizeArgs {
  static constexpr const char* kOp = "dequantize";
  QuantizedWeight w;
  Tensor out;
  Stream stream;
};

struct MatvecArgs {
  static constexpr const char* kOp = "matvec";
  Tensor x;
  Weight w;
  Tensor y;
  Stream stream;
};

inline constexpr int kMaxMultiOutputs = 4;

struct MatvecMultiArgs {
  static constexpr const char* kOp = "matvec_multi";
  Tensor x;
  int count = 0;
  std::array<Weight, kMaxMultiOutputs> w;
  std::array<Tensor, kMaxMultiOutputs> y;
  Stream stream;
};

struct OutputProjectionArgs {
  static constexpr const char* kOp = "output_projection";
  Tensor attn;
  Weight wo;
  Tensor residual, out;
  Stream stream;
};

struct MlpBlockArgs {
  static constexpr const char* kOp = "mlp_block";
  Tensor x;
  Weight gate, up, down;
  Tensor out;
  Stream stream;
};

struct DecodeBlockArgs {
  static constexpr const char* kOp = "decode_block";
  Tensor x;
  DecodeLayerWeights weights;
  DecodeLayerConfig config;  // rope.rotary_dim resolved
  PagedKV cache;
  Tensor out;
  Stream stream;
  std::span<const OpBackend> per_op;  // the backends of its pieces (RunOptions::per_op)
};

}  // namespace decodelab
