// The CUDA backend (Hopper, sm_90a): kernel -> launcher (raw pointers and a stream) -> these
// adapters from the validated Args. Listed in src/cuda/kernels.inc.
#pragma once

#include <string>

#include "ops/args.h"

namespace decodelab::cuda {

// layers.cu
void rms_norm(const RmsNormArgs& a);
void rms_norm_residual(const RmsNormResidualArgs& a);
void residual_add(const ResidualAddArgs& a);
void bias_add(const BiasAddArgs& a);
void swiglu(const SwigluArgs& a);

// cache.cu: KV appends (contiguous, paged), the QKV split family and RoPE; head_dim <= 256.
void kv_append(const KvAppendArgs& a);
void kv_append_paged(const KvAppendPagedArgs& a);
void qkv_split(const QkvSplitArgs& a);
void qkv_split_rope(const QkvSplitRopeArgs& a);
void qkv_rope_append(const QkvRopeAppendArgs& a);
void qkv_rope_append_paged(const QkvRopeAppendPagedArgs& a);
void rope(const RopeArgs& a);
std::string kv_append_supports(const KvAppendArgs& a);
std::string kv_append_paged_supports(const KvAppendPagedArgs& a);
std::string qkv_split_supports(const QkvSplitArgs& a);
std::string qkv_split_rope_supports(const QkvSplitRopeArgs& a);
std::string qkv_rope_append_supports(const QkvRopeAppendArgs& a);
std::string qkv_rope_append_paged_supports(const QkvRopeAppendPagedArgs& a);
std::string rope_supports(const RopeArgs& a);

// attention.cu: decode (Sq = 1) over contiguous and paged caches, split-K with a log-sum-exp merge
// (the tensor-core kernel for f16/bf16, a CUDA-core kernel for f32).
void decode_attention(const DecodeAttentionArgs& a);
void decode_attention_paged(const DecodeAttentionPagedArgs& a);
// cuda.tiled: K/V tiles staged in shared memory, a tile's scores, softmax and values in phases.
void decode_attention_tiled(const DecodeAttentionArgs& a);
void decode_attention_paged_tiled(const DecodeAttentionPagedArgs& a);
std::string decode_attention_supports(const DecodeAttentionArgs& a);
std::string decode_attention_paged_supports(const DecodeAttentionPagedArgs& a);

// matvec.cu: dense (f32, f16, bf16) and quantized (MLX affine 4/8-bit, GGUF Q4_0/Q8_0) weights,
// batch 1..16, and the ops built on the same kernel; the stable cuda backend, which hands some
// calls to matvec_mma.cu (prefers_tensor_cores).
void matvec(const MatvecArgs& a);
void matvec_multi(const MatvecMultiArgs& a);
void output_projection(const OutputProjectionArgs& a);
void mlp_block(const MlpBlockArgs& a);
std::string matvec_supports(const MatvecArgs& a);
std::string matvec_multi_supports(const MatvecMultiArgs& a);
std::string output_projection_supports(const OutputProjectionArgs& a);
std::string mlp_block_supports(const MlpBlockArgs& a);
// matvec_mma.cu (cuda.mma): the same ops on the tensor cores, f16/bf16 x over dense weights of x's
// dtype or quantized ones; the weights are rounded to x's dtype as they are dequantized.
void matvec_mma(const MatvecArgs& a);
void matvec_multi_mma(const MatvecMultiArgs& a);
void output_projection_mma(const OutputProjectionArgs& a);
void mlp_block_mma(const MlpBlockArgs& a);
std::string matvec_mma_supports(const MatvecArgs& a);
std::string matvec_multi_mma_supports(const MatvecMultiArgs& a);
std::string output_projection_mma_supports(const OutputProjectionArgs& a);
std::string mlp_block_mma_supports(const MlpBlockArgs& a);
// matvec_staged.cu (cuda.staged): cuda.mma's multiply with the weights staged in shared memory by
// cp.async; K a whole number of stages (32 units of each row), 16-byte aligned arrays, one MLX
// group size per launch.
void matvec_staged(const MatvecArgs& a);
void matvec_multi_staged(const MatvecMultiArgs& a);
void output_projection_staged(const OutputProjectionArgs& a);
void mlp_block_staged(const MlpBlockArgs& a);
std::string matvec_staged_supports(const MatvecArgs& a);
std::string matvec_multi_staged_supports(const MatvecMultiArgs& a);
std::string output_projection_staged_supports(const OutputProjectionArgs& a);
std::string mlp_block_staged_supports(const MlpBlockArgs& a);
// Its plan, shared by the kernel and supports(): stages of kStagedUnits units of each of a tile's
// 16 rows, as many buffers as fit kStagedBudget (2 to 6), at most kStagedSharedLimit of dynamic
// shared memory (the H100/H200 allow a block 227 KB).
inline constexpr int64_t kStagedUnits = 32;
inline constexpr int64_t kStagedTileRows = 16;
inline constexpr int64_t kStagedBudget = int64_t{40} << 10;
inline constexpr int64_t kStagedSharedLimit = int64_t{200} << 10;
constexpr int staged_stages(int64_t stage_bytes) {
  const int64_t fit = kStagedBudget / stage_bytes;
  return int(fit < 2 ? 2 : fit > 6 ? 6 : fit);
}
// matvec_codes.cu (cuda.codes): batch 1, f16 x, MLX affine 4-bit weights of group 64 on the tensor
// cores with the raw codes as operands and the scales applied per group after the mma; K a
// multiple of 512 and at most kCodesMaxK (x is held in shared memory, 2 bytes an input).
void matvec_codes(const MatvecArgs& a);
void matvec_multi_codes(const MatvecMultiArgs& a);
void output_projection_codes(const OutputProjectionArgs& a);
void mlp_block_codes(const MlpBlockArgs& a);
std::string matvec_codes_supports(const MatvecArgs& a);
std::string matvec_multi_codes_supports(const MatvecMultiArgs& a);
std::string output_projection_codes_supports(const OutputProjectionArgs& a);
std::string mlp_block_codes_supports(const MlpBlockArgs& a);
inline constexpr int64_t kCodesMaxK = int64_t{48} << 10;
// Where the stable cuda matvecs hand a call they could both run to the tensor cores: every batch of
// 2 or more, and 4-bit weights at batch 1 (docs/perf/NOTES.md, H200); the CUDA-core kernel keeps
// dense and 8-bit weights at batch 1, where it measured faster.
bool prefers_tensor_cores(const Weight& w, const Tensor& x);
// Where they hand it to cuda.codes first: batch-1 MLX 4-bit weights of group 64 over f16 x
// (docs/perf/NOTES.md, H200).
bool prefers_codes(const Weight& w, const Tensor& x);
std::string decode_block_supports(const DecodeBlockArgs& a);

// turboquant_append.cu, turboquant_attention.cu: the paged TurboQuant cache (turboquant_cache.h);
// the codecs' rotations are uploaded once per rotation (turboquant_tables.h). The append encodes
// bit-exactly as TurboQuantMse::encode; the attention is fused (never decodes the cache).
void turboquant_append_paged(const TurboQuantAppendPagedArgs& a);
void turboquant_decode_attention_paged(const TurboQuantDecodeAttentionPagedArgs& a);
std::string turboquant_decode_attention_paged_supports(const TurboQuantDecodeAttentionPagedArgs& a);
// turboquant_attention_mma.cu: the same attention with scores and values on the tensor cores
// (cuda.mma): 4-bit K and V, head_dim 64/128/256, f16 or bf16 q (f16 operands).
void turboquant_decode_attention_paged_mma(const TurboQuantDecodeAttentionPagedArgs& a);
std::string turboquant_decode_attention_paged_mma_supports(const TurboQuantDecodeAttentionPagedArgs& a);
// rabitq_attention.cu, qjl_attention.cu: fused attention over the paged RaBitQ-key and QJL-key
// caches with TurboQuant values (rabitq_cache.h, qjl_cache.h), record_attention.cuh's kernel.
void rabitq_decode_attention_paged(const RabitqDecodeAttentionPagedArgs& a);
std::string rabitq_decode_attention_paged_supports(const RabitqDecodeAttentionPagedArgs& a);
void qjl_decode_attention_paged(const QjlDecodeAttentionPagedArgs& a);
std::string qjl_decode_attention_paged_supports(const QjlDecodeAttentionPagedArgs& a);
// rabitq_append.cu, qjl_append.cu: the RaBitQ-key and QJL-key caches' appends, bit-exact with
// RabitqKeys::encode, QjlKeys::encode and TurboQuantMse::encode (turboquant_encode.cuh).
void rabitq_append_paged(const RabitqAppendPagedArgs& a);
void qjl_append_paged(const QjlAppendPagedArgs& a);
// kivi_attention.cu: fused attention over the paged KIVI cache (kivi_cache.h), scores from the key
// blocks' codes with q folded per block, values from their records' codes and the f32 recent window
// as it is; the append stays on the host backends.
void kivi_decode_attention_paged(const KiviDecodeAttentionPagedArgs& a);
std::string kivi_decode_attention_paged_supports(const KiviDecodeAttentionPagedArgs& a);

}  // namespace decodelab::cuda
