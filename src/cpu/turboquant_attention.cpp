// CPU fused decode attention over the paged TurboQuant (MSE) cache (turboquant_cache.h): the
// scores and the value sum are computed in the rotated domain, straight from the codes.
//
// A record holds x's norm n and the codebook indices of y = R x / n, so with q' = R_K q,
//   q . x~_K = n s sum_j q'_j c_K[idx_j]      (s = 1, or 1 / ||c_K[idx]|| norm-corrected)
// since R_K is orthogonal, and sum_t p_t x~_V,t = R_V^T sum_t p_t n_t s_t c_V[idx_t]. Both sides
// are TurboQuantCodes; the tasks, tiles and phases are rotated_attention-inl.h's.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/turboquant_attention.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "cpu/simd.h"
#include "cpu/attention_tiles-inl.h"
#include "cpu/expand_codes-inl.h"
#include "cpu/rotated_attention-inl.h"

#include "cpu/cpu.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {

void TurboQuantDecodeAttentionPaged(const TurboQuantDecodeAttentionPagedArgs& a) {
  RotatedDecodeAttention(a, TurboQuantCodes(a.cache.k_pages, *a.cache.k_codec), a.cache.k_codec->rotation(),
                         *a.cache.v_codec);
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace decodelab::cpu {

HWY_EXPORT(TurboQuantDecodeAttentionPaged);

void turboquant_decode_attention_paged(const TurboQuantDecodeAttentionPagedArgs& a) {
  HWY_DYNAMIC_DISPATCH(TurboQuantDecodeAttentionPaged)(a);
}

}  // namespace decodelab::cpu
#endif  // HWY_ONCE
