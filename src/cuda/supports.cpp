// What the CUDA kernels take, in words: the supports() functions of src/cuda/kernels.inc. Kept in
// plain C++ (fmt's compile-time format checks do not build under nvcc) and in step with the
// launchers' template dispatch in attention.cu, matvec_formats.cuh, matvec.cu, matvec_mma.cu and
// the record-cache attention files (turboquant_, rabitq_, qjl_ and kivi_attention.cu).
#include <fmt/format.h>

#include <utility>

#include "cuda/cuda.h"

namespace decodelab::cuda {
namespace {

std::string decode_supports(const Tensor& q) {
  const int64_t d = q.dim(3);
  if (q.dim(1) != 1) return fmt::format("decode only (Sq = 1), got Sq = {}", q.dim(1));
  if (d != 64 && d != 128 && (d != 256 || q.dtype == DType::f32)) {
    return fmt::format("head_dim 64, 128 or 256 (f16/bf16), got {} {}", d, dtype_name(q.dtype));
  }
  return {};
}


// The matvec kernels' conditions on one weight over x (see matvec_formats.cuh): batch <= 16, 16-byte aligned
// rows of x and of dense or MLX weights, MLX scales in x's dtype, GGUF blocks 2-byte aligned.
std::string matvec_weight_supports(const Weight& w, const Tensor& x) {
  constexpr int64_t kMaxBatch = 16;
  const auto aligned = [](const void* p, uintptr_t to) { return reinterpret_cast<uintptr_t>(p) % to == 0; };
  if (x.dim(0) > kMaxBatch) return fmt::format("batch <= {}, got {}", kMaxBatch, x.dim(0));
  if (!aligned(x.data, 16) || x.dim(1) * int64_t(dtype_size(x.dtype)) % 16 != 0) {
    return "x rows 16-byte aligned (K * dtype size a multiple of 16, an aligned start)";
  }
  if (!w.is_quantized) {
    const int64_t vec = 16 / int64_t(dtype_size(w.dense.dtype));
    if (w.cols() % vec != 0) return fmt::format("K a multiple of {} (16-byte rows), got {}", vec, w.cols());
    if (!aligned(w.dense.data, 16)) return "dense weights 16-byte aligned";
    return {};
  }
  const QuantizedWeight& q = w.quantized;
  if (q.spec.format == QuantFormat::mlx_affine) {
    if (!aligned(q.packed.data, 16)) return "MLX packed codes 16-byte aligned";
    if (q.scales.dtype != x.dtype) {
      return fmt::format("MLX scales in x's dtype {}, got {}", dtype_name(x.dtype), dtype_name(q.scales.dtype));
    }
    return {};
  }
  if (!aligned(q.packed.data, 2)) return "GGUF blocks 2-byte aligned";
  return {};
}

// The tensor-core kernel's extra condition: 16-bit operands, x's dtype (dense weights too).
std::string mma_operands_supports(const Weight& w, const Tensor& x) {
  if (x.dtype != DType::f16 && x.dtype != DType::bf16) {
    return fmt::format("f16 or bf16 activations (tensor-core operands), got {}", dtype_name(x.dtype));
  }
  if (!w.is_quantized && w.dense.dtype != x.dtype) {
    return fmt::format("dense weights in x's dtype {}, got {}", dtype_name(x.dtype), dtype_name(w.dense.dtype));
  }
  return {};
}

// Weights that one launch can read together: one format, one dtype.
bool same_format(const Weight& a, const Weight& b) {
  if (a.is_quantized != b.is_quantized) return false;
  if (!a.is_quantized) return a.dense.dtype == b.dense.dtype;
  return a.quantized.spec.format == b.quantized.spec.format && a.quantized.spec.bits == b.quantized.spec.bits &&
         a.quantized.scales.dtype == b.quantized.scales.dtype;
}

// The rope/scatter kernel of cache.cu keeps a token's cos/sin table for D / 2 pairs.
std::string head_dim_supports(const Tensor& t) {
  constexpr int64_t kMaxHeadDim = 256;
  const int64_t d = t.dim(t.rank - 1);
  if (d > kMaxHeadDim) return fmt::format("head_dim <= {}, got {}", kMaxHeadDim, d);
  return {};
}

}  // namespace

std::string kv_append_supports(const KvAppendArgs& a) { return head_dim_supports(a.k_new); }
std::string kv_append_paged_supports(const KvAppendPagedArgs& a) { return head_dim_supports(a.k_new); }
std::string qkv_split_supports(const QkvSplitArgs& a) { return head_dim_supports(a.q); }
std::string qkv_split_rope_supports(const QkvSplitRopeArgs& a) { return head_dim_supports(a.q); }
std::string qkv_rope_append_supports(const QkvRopeAppendArgs& a) { return head_dim_supports(a.q_out); }
std::string qkv_rope_append_paged_supports(const QkvRopeAppendPagedArgs& a) { return head_dim_supports(a.q_out); }
std::string rope_supports(const RopeArgs& a) { return head_dim_supports(a.x); }

std::string decode_attention_supports(const DecodeAttentionArgs& a) { return decode_supports(a.q); }
std::string decode_attention_paged_supports(const DecodeAttentionPagedArgs& a) { return decode_supports(a.q); }

std::string matvec_supports(const MatvecArgs& a) { return matvec_weight_supports(a.w, a.x); }

std::string matvec_multi_supports(const MatvecMultiArgs& a) {
  for (int i = 0; i < a.count; ++i) {
    if (std::string why = matvec_weight_supports(a.w[size_t(i)], a.x); !why.empty()) return why;
    if (!same_format(a.w[0], a.w[size_t(i)])) return "weights of one format and dtype";
  }
  return {};
}

std::string output_projection_supports(const OutputProjectionArgs& a) { return matvec_weight_supports(a.wo, a.attn); }

// The composed block (src/ops/decode_block_composed.cpp) runs the CUDA pieces: their conditions.
std::string decode_block_supports(const DecodeBlockArgs& a) {
  const DecodeLayerConfig& c = a.config;
  if (c.head_dim != 64 && c.head_dim != 128 && (c.head_dim != 256 || a.x.dtype == DType::f32)) {
    return fmt::format("head_dim 64, 128 or 256 (f16/bf16) for the attention, got {}", c.head_dim);
  }
  for (const Weight* w : {&a.weights.wq, &a.weights.wk, &a.weights.wv, &a.weights.gate}) {
    if (std::string why = matvec_weight_supports(*w, a.x); !why.empty()) return why;
  }
  return mlp_block_supports(MlpBlockArgs{a.x, a.weights.gate, a.weights.up, a.weights.down, a.x, a.stream});
}

std::string mlp_block_supports(const MlpBlockArgs& a) {
  if (std::string why = matvec_weight_supports(a.gate, a.x); !why.empty()) return why;
  if (!same_format(a.gate, a.up)) return "gate and up of one format and dtype";
  // The down matvec reads the activation from scratch memory (aligned) in the output dtype.
  if (a.down.is_quantized && a.down.quantized.spec.format == QuantFormat::mlx_affine &&
      a.down.quantized.scales.dtype != a.out.dtype) {
    return "MLX scales of down in the output dtype";
  }
  if (a.gate.rows() * int64_t(dtype_size(a.out.dtype)) % 16 != 0) return "intermediate size * dtype size a multiple of 16";
  return {};
}

// cuda.mma: the CUDA-core kernel's conditions, plus 16-bit operands for every weight.
std::string matvec_mma_supports(const MatvecArgs& a) {
  if (std::string why = mma_operands_supports(a.w, a.x); !why.empty()) return why;
  return matvec_supports(a);
}

std::string matvec_multi_mma_supports(const MatvecMultiArgs& a) {
  for (int i = 0; i < a.count; ++i) {
    if (std::string why = mma_operands_supports(a.w[size_t(i)], a.x); !why.empty()) return why;
  }
  return matvec_multi_supports(a);
}

std::string output_projection_mma_supports(const OutputProjectionArgs& a) {
  if (std::string why = mma_operands_supports(a.wo, a.attn); !why.empty()) return why;
  return output_projection_supports(a);
}

std::string mlp_block_mma_supports(const MlpBlockArgs& a) {
  for (const Weight* w : {&a.gate, &a.up, &a.down}) {
    if (std::string why = mma_operands_supports(*w, a.x); !why.empty()) return why;
  }
  return mlp_block_supports(a);
}

// cuda.staged: cuda.mma's conditions, and the staging's (matvec_staged.cu): K a whole number of
// stages, every array and row 16-byte aligned (MLX: K / group_size a multiple of 8), and the
// stages plus a tile's MLX scales and biases within the shared memory a block may have.
std::string staged_weight_supports(const Weight& w, int parts) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const int64_t k = w.cols();
  int64_t unit_inputs = 0, unit_bytes = 16, side_bytes = 0;
  if (!w.is_quantized) {
    unit_inputs = 16 / int64_t(dtype_size(w.dense.dtype));
  } else {
    const QuantizedWeight& q = w.quantized;
    if (!aligned(q.packed.data)) return "packed weights 16-byte aligned";
    if (q.spec.format == QuantFormat::mlx_affine) {
      unit_inputs = 128 / q.spec.bits;
      const int64_t groups = k / q.spec.group_size;
      if (groups % 8 != 0) return fmt::format("K / group_size a multiple of 8 (16-byte scale rows), got {}", groups);
      if (!aligned(q.scales.data) || !aligned(q.biases.data)) return "MLX scales and biases 16-byte aligned";
      side_bytes = 2 * kStagedTileRows * groups * int64_t(dtype_size(q.scales.dtype));
    } else {
      unit_inputs = 32;
      unit_bytes = q.spec.format == QuantFormat::gguf_q4_0 ? 18 : 34;
    }
  }
  const int64_t stage_k = kStagedUnits * unit_inputs;
  if (k % stage_k != 0) return fmt::format("K a multiple of {} (whole stages of {} units a row), got {}", stage_k, kStagedUnits, k);
  const int64_t stage_bytes = parts * kStagedTileRows * kStagedUnits * unit_bytes;
  const int64_t shared = staged_stages(stage_bytes) * stage_bytes + parts * side_bytes;
  if (shared > kStagedSharedLimit) {
    return fmt::format("at most {} bytes of shared memory a block, got {} (K = {})", kStagedSharedLimit, shared, k);
  }
  return {};
}

std::string aligned_pool_supports(const Tensor& pool, const char* name) {
  if (reinterpret_cast<uintptr_t>(pool.data) % 4 != 0) return fmt::format("the {} pool 4-byte aligned", name);
  return {};
}

// record_attention.cuh's fused kernel copies records in 4-byte words: the pools must be 4-byte
// aligned (records are whole words for the head_dims, bits, splits and sketch sizes it is
// instantiated for, so aligned pools give aligned records). One TurboQuant side: 2, 3 or 4 bits,
// and a split width's wide part a whole number of 32-coordinate chunks (then each chunk of a row
// lies in one run of indices, and both runs are whole words).
std::string record_side_supports(const kvquant::TurboQuantMse* codec, const Tensor& pool, const char* name) {
  const int bits = codec->config().bits;
  if (bits < 2 || bits > 4) return fmt::format("{} codes of 2, 3 or 4 bits, got {}", name, bits);
  if (const int64_t h = codec->config().high_bits_channels; h % 32 != 0) {
    return fmt::format("{} split width with a multiple of 32 wide channels, got {} (high_bits_channels)", name, h);
  }
  return aligned_pool_supports(pool, name);
}

// The RaBitQ- and QJL-key kernels: a 4-byte aligned key pool, and values of one integer width
// only (they are instantiated without split widths).
std::string keyed_record_supports(const Tensor& k_pool, const kvquant::TurboQuantMse* v_codec, const Tensor& v_pool) {
  if (std::string why = aligned_pool_supports(k_pool, "K"); !why.empty()) return why;
  if (v_codec->config().high_bits_channels != 0) {
    return fmt::format("V codes of one integer width (split widths: the TurboQuant cache only), got {:g} bits",
                       v_codec->config().bits_per_coordinate());
  }
  return record_side_supports(v_codec, v_pool, "V");
}

// The head_dims record_attention.cuh's kernel is instantiated for.
std::string record_head_dim_supports(const Tensor& q) {
  const int64_t d = q.dim(2);
  if (d != 64 && d != 96 && d != 128 && d != 256) return fmt::format("head_dim 64, 96, 128 or 256, got {}", d);
  return {};
}

std::string turboquant_decode_attention_paged_supports(const TurboQuantDecodeAttentionPagedArgs& a) {
  if (std::string why = record_head_dim_supports(a.q); !why.empty()) return why;
  if (std::string why = record_side_supports(a.cache.k_codec, a.cache.k_pages, "K"); !why.empty()) return why;
  return record_side_supports(a.cache.v_codec, a.cache.v_pages, "V");
}

// RaBitQ records are two f32s and B planes of D / 8 bytes: whole words for the head_dims taken.
std::string rabitq_decode_attention_paged_supports(const RabitqDecodeAttentionPagedArgs& a) {
  if (std::string why = record_head_dim_supports(a.q); !why.empty()) return why;
  return keyed_record_supports(a.cache.k_pages, a.cache.v_codec, a.cache.v_pages);
}

// QJL records are an f32 and m / 8 bytes of signs: the kernel is instantiated for these m.
std::string qjl_decode_attention_paged_supports(const QjlDecodeAttentionPagedArgs& a) {
  if (std::string why = record_head_dim_supports(a.q); !why.empty()) return why;
  const int64_t m = a.cache.k_codec->config().sketch_dim;
  if (m != 64 && m != 128 && m != 256 && m != 512) return fmt::format("a K sketch of 64, 128, 256 or 512 rows, got {}", m);
  return keyed_record_supports(a.cache.k_pages, a.cache.v_codec, a.cache.v_pages);
}

// kivi_attention.cu's kernel: the head_dims above (every bit width, 1 to 4); value groups of a
// multiple of 8 channels (a thread's 8 channels lie in one group, and a record of at most D / 8
// groups fits the stage's row); 4-byte aligned pools, whose key blocks and value records are then
// aligned whole words at these head_dims (8 D + G D b / 8 and 8 D / value_group + D b / 8 bytes),
// copied a word at a time; and a 16-byte aligned ring, read 4 floats at a time.
std::string kivi_decode_attention_paged_supports(const KiviDecodeAttentionPagedArgs& a) {
  if (std::string why = record_head_dim_supports(a.q); !why.empty()) return why;
  if (const int64_t g = a.cache.codec->config().value_group; g % 8 != 0) {
    return fmt::format("value groups of a multiple of 8 channels, got {}", g);
  }
  if (std::string why = aligned_pool_supports(a.cache.k_pages, "K"); !why.empty()) return why;
  if (std::string why = aligned_pool_supports(a.cache.v_pages, "V"); !why.empty()) return why;
  const std::pair<const Tensor*, const char*> rings[] = {{&a.cache.recent_k, "recent_k"},
                                                          {&a.cache.recent_v, "recent_v"}};
  for (const auto& [ring, name] : rings) {
    if (reinterpret_cast<uintptr_t>(ring->data) % 16 != 0) return fmt::format("the {} ring 16-byte aligned", name);
  }
  return {};
}

std::string turboquant_decode_attention_paged_mma_supports(const TurboQuantDecodeAttentionPagedArgs& a) {
  if (a.q.dtype == DType::f32) return "f16 or bf16 q (the scores and values use f16 tensor-core operands), got f32";
  const int64_t d = a.q.dim(2);
  if (d != 64 && d != 128 && d != 256) return fmt::format("head_dim 64, 128 or 256, got {}", d);
  for (const auto& [codec, name] : {std::pair{a.cache.k_codec, "K"}, std::pair{a.cache.v_codec, "V"}}) {
    if (codec->config().bits != 4) return fmt::format("{} codes of 4 bits, got {}", name, codec->config().bits);
  }
  return turboquant_decode_attention_paged_supports(a);
}

std::string matvec_staged_supports(const MatvecArgs& a) {
  if (std::string why = staged_weight_supports(a.w, 1); !why.empty()) return why;
  return matvec_mma_supports(a);
}

// One launch lays out every part's MLX scales with the first weight's group size.
std::string same_group_size(const Weight& first, const Weight& w) {
  if (!first.is_quantized || !w.is_quantized || first.quantized.spec.group_size == w.quantized.spec.group_size) return {};
  return fmt::format("one MLX group size for the weights of a launch, got {} and {}", first.quantized.spec.group_size,
                     w.quantized.spec.group_size);
}

std::string matvec_multi_staged_supports(const MatvecMultiArgs& a) {
  for (int i = 0; i < a.count; ++i) {
    if (std::string why = staged_weight_supports(a.w[size_t(i)], 1); !why.empty()) return why;
    if (std::string why = same_group_size(a.w[0], a.w[size_t(i)]); !why.empty()) return why;
  }
  return matvec_multi_mma_supports(a);
}

std::string output_projection_staged_supports(const OutputProjectionArgs& a) {
  if (std::string why = staged_weight_supports(a.wo, 1); !why.empty()) return why;
  return output_projection_mma_supports(a);
}

std::string mlp_block_staged_supports(const MlpBlockArgs& a) {
  for (const Weight* w : {&a.gate, &a.up}) {
    if (std::string why = staged_weight_supports(*w, 2); !why.empty()) return why;
  }
  if (std::string why = same_group_size(a.gate, a.up); !why.empty()) return why;
  if (std::string why = staged_weight_supports(a.down, 1); !why.empty()) return why;
  return mlp_block_mma_supports(a);
}

// cuda.codes (matvec_codes.cu): batch 1, f16 x, MLX 4-bit codes of group 64 with f16 scales,
// whole steps of the kernel's groups (K a multiple of 512) and x within its shared memory.
std::string codes_weight_supports(const Weight& w, const Tensor& x) {
  if (x.dtype != DType::f16) return fmt::format("f16 activations, got {}", dtype_name(x.dtype));
  if (x.dim(0) != 1) return fmt::format("batch 1 (larger batches: cuda.mma), got {}", x.dim(0));
  if (!w.is_quantized || w.quantized.spec.format != QuantFormat::mlx_affine || w.quantized.spec.bits != 4 ||
      w.quantized.spec.group_size != 64) {
    return "MLX affine 4-bit weights of group size 64";
  }
  const int64_t k = w.cols();
  if (k % 512 != 0 || k > kCodesMaxK) return fmt::format("K a multiple of 512 and at most {}, got {}", kCodesMaxK, k);
  return matvec_weight_supports(w, x);
}

std::string matvec_codes_supports(const MatvecArgs& a) { return codes_weight_supports(a.w, a.x); }

std::string matvec_multi_codes_supports(const MatvecMultiArgs& a) {
  for (int i = 0; i < a.count; ++i) {
    if (std::string why = codes_weight_supports(a.w[size_t(i)], a.x); !why.empty()) return why;
  }
  return matvec_multi_supports(a);
}

std::string output_projection_codes_supports(const OutputProjectionArgs& a) {
  return codes_weight_supports(a.wo, a.attn);
}

// The down matvec reads the activation in the output dtype: f16 too.
std::string mlp_block_codes_supports(const MlpBlockArgs& a) {
  for (const Weight* w : {&a.gate, &a.up}) {
    if (std::string why = codes_weight_supports(*w, a.x); !why.empty()) return why;
  }
  if (a.out.dtype != DType::f16) return fmt::format("f16 output (the down matvec's input), got {}", dtype_name(a.out.dtype));
  const Tensor act = Tensor::contiguous(nullptr, a.out.dtype, {a.x.dim(0), a.gate.rows()}, Device::cuda);
  if (std::string why = codes_weight_supports(a.down, act); !why.empty()) return fmt::format("down: {}", why);
  return mlp_block_supports(a);
}

bool prefers_tensor_cores(const Weight& w, const Tensor& x) {
  if (x.dtype != DType::f16 && x.dtype != DType::bf16) return false;  // before any refusal text is made
  return x.dim(0) >= 2 || (w.is_quantized && w.quantized.spec.bits == 4);
}

bool prefers_codes(const Weight& w, const Tensor& x) {
  // The same weights as codes_weight_supports() asks for, checked without building its refusal
  // text on every other call (the matvecs' hot path).
  return x.dtype == DType::f16 && x.dim(0) == 1 && w.is_quantized && w.quantized.spec.format == QuantFormat::mlx_affine &&
         w.quantized.spec.bits == 4 && w.quantized.spec.group_size == 64;
}

}  // namespace decodelab::cuda
