// The reference backend: the definition of every op. Plain loops, double accumulation, no
// threads, no SIMD. Arguments arrive validated (src/ops). Outputs may also be f64, which the
// verification harness uses as its oracle.
#pragma once

#include "ops/args.h"

namespace decodelab::reference {

void rms_norm(const RmsNormArgs& a);
void residual_add(const ResidualAddArgs& a);
void bias_add(const BiasAddArgs& a);
void rms_norm_residual(const RmsNormResidualArgs& a);
void swiglu(const SwigluArgs& a);
void rope(const RopeArgs& a);

void kv_append(const KvAppendArgs& a);
void kv_append_paged(const KvAppendPagedArgs& a);
void qkv_split(const QkvSplitArgs& a);
void qkv_split_rope(const QkvSplitRopeArgs& a);
void qkv_rope_append(const QkvRopeAppendArgs& a);
void qkv_rope_append_paged(const QkvRopeAppendPagedArgs& a);

void prefill_attention(const PrefillAttentionArgs& a);
void decode_attention(const DecodeAttentionArgs& a);
void decode_attention_paged(const DecodeAttentionPagedArgs& a);

void turboquant_append_paged(const TurboQuantAppendPagedArgs& a);
void turboquant_decode_attention_paged(const TurboQuantDecodeAttentionPagedArgs& a);
void kivi_append_paged(const KiviAppendPagedArgs& a);
void kivi_decode_attention_paged(const KiviDecodeAttentionPagedArgs& a);
void rabitq_append_paged(const RabitqAppendPagedArgs& a);
void rabitq_decode_attention_paged(const RabitqDecodeAttentionPagedArgs& a);
void qjl_append_paged(const QjlAppendPagedArgs& a);
void qjl_decode_attention_paged(const QjlDecodeAttentionPagedArgs& a);

void quantize(const QuantizeArgs& a);
void dequantize(const DequantizeArgs& a);
void matvec(const MatvecArgs& a);
void matvec_multi(const MatvecMultiArgs& a);
void output_projection(const OutputProjectionArgs& a);
void mlp_block(const MlpBlockArgs& a);

void decode_block(const DecodeBlockArgs& a);

// The owners' quantization formats have exactly one right answer, so the CPU backend runs this
// same code over row ranges in parallel rather than a second copy of it.
void quantize_rows(const QuantizeArgs& a, int64_t row_begin, int64_t row_end);
void dequantize_rows(const DequantizeArgs& a, int64_t row_begin, int64_t row_end);
// Likewise the compressed caches' appends: their codes are the codecs' encoders', so the CPU
// backend runs the encoders themselves over row ranges. The TurboQuant, RaBitQ-key and QJL-key
// caches' over the B * S * Hkv (sequence, new token, KV head) rows (append_record_rows,
// record_append.h); the KIVI append over the B * Hkv (sequence, KV head) rows, each taking its S
// tokens in order (a token may quantize a value or a key block of earlier ones: kivi_cache.h).
void kivi_append_rows(const KiviAppendPagedArgs& a, int64_t row_begin, int64_t row_end);
int64_t kivi_append_row_count(const KiviAppendPagedArgs& a);

}  // namespace decodelab::reference
