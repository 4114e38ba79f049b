// The CPU backend: SIMD through Google Highway (one source, dispatched at run time to the best
// target the machine supports: AVX-512, AVX2, SSE4, ... or NEON/SVE elsewhere), threads through the
// shared pool (thread_pool.h). f16 and bf16 stay in memory as such and are widened in registers;
// arithmetic is f32. Each kernel here is listed in one of the backend's kernel lists
// (layers_kernels.inc, matvec_kernels.inc, attention_kernels.inc).
#pragma once

#include <string>

#include "ops/args.h"

namespace decodelab::cpu {

// layers.cpp
void rms_norm(const RmsNormArgs& a);
void residual_add(const ResidualAddArgs& a);
void bias_add(const BiasAddArgs& a);
void rms_norm_residual(const RmsNormResidualArgs& a);
void swiglu(const SwigluArgs& a);
void rope(const RopeArgs& a);

// cache.cpp
void kv_append(const KvAppendArgs& a);
void kv_append_paged(const KvAppendPagedArgs& a);
void qkv_split(const QkvSplitArgs& a);
void qkv_split_rope(const QkvSplitRopeArgs& a);
void qkv_rope_append(const QkvRopeAppendArgs& a);
void qkv_rope_append_paged(const QkvRopeAppendPagedArgs& a);

// quant.cpp
void quantize(const QuantizeArgs& a);
void dequantize(const DequantizeArgs& a);
void turboquant_append_paged(const TurboQuantAppendPagedArgs& a);
void kivi_append_paged(const KiviAppendPagedArgs& a);
void rabitq_append_paged(const RabitqAppendPagedArgs& a);
void qjl_append_paged(const QjlAppendPagedArgs& a);

// turboquant_attention.cpp
void turboquant_decode_attention_paged(const TurboQuantDecodeAttentionPagedArgs& a);

// kivi_attention.cpp
void kivi_decode_attention_paged(const KiviDecodeAttentionPagedArgs& a);

// rabitq_attention.cpp
void rabitq_decode_attention_paged(const RabitqDecodeAttentionPagedArgs& a);

// qjl_attention.cpp
void qjl_decode_attention_paged(const QjlDecodeAttentionPagedArgs& a);

}  // namespace decodelab::cpu

// The matvec family (matvec.cpp) and attention (attention.cpp) declare their kernels in
// cpu/matvec.h and cpu/attention.h.
