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
void swiglu(const SwigluArgs& a);

// attention.cu: decode (Sq = 1) over contiguous and paged caches, split-K with a log-sum-exp merge.
void decode_attention(const DecodeAttentionArgs& a);
void decode_attention_paged(const DecodeAttentionPagedArgs& a);
std::string decode_attention_supports(const DecodeAttentionArgs& a);
std::string decode_attention_paged_supports(const DecodeAttentionPagedArgs& a);

// matvec.cu: dense weights, batch 1..16.
void matvec(const MatvecArgs& a);
std::string matvec_supports(const MatvecArgs& a);

}  // namespace decodelab::cuda
