// CPU fused decode attention over the paged RaBitQ-key / TurboQuant-value cache (rabitq_cache.h):
// the scores are RaBitQ's estimator with the full-precision query, computed in the key rotation's
// domain straight from the codes; the value side is the TurboQuant kernel's.
//
// A key record holds n = ||k - c||, the correction <o_bar, o> and the codes u of the grid point y,
// so with q' = R_K q,
//   <q, k>^ - <q, c> = n <y, q'> / (||y|| <o_bar, o>)
// (kvquant.h): a key's row is y (ExpandPlanes), its factor n / (||y|| <o_bar, o>), and <q, c>,
// the same for every token of a query, drops out of the softmax. The tasks, tiles and phases are
// rotated_attention-inl.h's.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/rabitq_attention.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "cpu/simd.h"
#include "cpu/attention_tiles-inl.h"
#include "cpu/expand_codes-inl.h"
#include "cpu/rotated_attention-inl.h"

#include "cpu/cpu.h"
#include "kvquant/rabitq_record.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {

// The key side of a RaBitQ pool, as RotatedDecodeAttention reads it.
struct RabitqCodes {
  using ExpandFn = void (*)(const uint8_t*, int64_t, int64_t, float*);
  const uint8_t* pages;
  int64_t record_bytes, plane_bytes;
  ExpandFn expand;

  RabitqCodes(const Tensor& pool, const kvquant::RabitqKeys& codec)
      : pages(pool.ptr<const uint8_t>()),
        record_bytes(codec.record_bytes()),
        plane_bytes(kvquant::packed_bytes(codec.config().head_dim, 1)) {
    const int bits = codec.config().bits;
    expand = bits == 1   ? ExpandPlanes<1>
             : bits == 2 ? ExpandPlanes<2>
             : bits == 3 ? ExpandPlanes<3>
                         : ExpandPlanes<4>;
  }

  const uint8_t* Record(int64_t index) const { return pages + index * record_bytes; }
  float Norm(int64_t index) const { return detail::load_f32_le(Record(index)); }
  float Correction(int64_t index) const { return detail::load_f32_le(Record(index) + detail::kRabitqCorrectionOffset); }
  bool Valid(int64_t index) const {
    return detail::is_valid_norm(Norm(index)) & detail::is_valid_rabitq_correction(Correction(index));
  }
  void Prefetch(int64_t index) const { PrefetchRecord(Record(index), record_bytes); }

  void CheckRecord(const detail::ArgCheck& check, const char* pool, int64_t b, int64_t t, int64_t h,
                   int64_t index) const {
    detail::check_paged_rabitq_record(check, Record(index), pool, b, t, h);
  }

  // Expands record `index` into its grid point y (d floats) and returns n / (||y|| <o_bar, o>);
  // ||y|| >= sqrt(d) / 2, as every |y_j| >= 1/2.
  HWY_INLINE float Expand(int64_t index, int64_t d, float* HWY_RESTRICT row) const {
    expand(Record(index) + detail::kRabitqPlanesOffset, plane_bytes, d, row);
    return Norm(index) / (std::sqrt(SquaredNorm(row, d)) * Correction(index));
  }
};

void RabitqDecodeAttentionPaged(const RabitqDecodeAttentionPagedArgs& a) {
  RotatedDecodeAttention(a, RabitqCodes(a.cache.k_pages, *a.cache.k_codec), a.cache.k_codec->rotation(),
                         *a.cache.v_codec);
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace decodelab::cpu {

HWY_EXPORT(RabitqDecodeAttentionPaged);

void rabitq_decode_attention_paged(const RabitqDecodeAttentionPagedArgs& a) {
  HWY_DYNAMIC_DISPATCH(RabitqDecodeAttentionPaged)(a);
}

}  // namespace decodelab::cpu
#endif  // HWY_ONCE
