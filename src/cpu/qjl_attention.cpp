// CPU fused decode attention over the paged QJL-key / TurboQuant-value cache (qjl_cache.h): the
// scores are QJL's asymmetric estimator, computed in the sketch's domain straight from the sign
// bits; the value side is the TurboQuant kernel's.
//
// A key record holds n = ||k|| and the signs s_i of (S k)_i, so with q' = S q (m values, once per
// query head, in double, rounded to f32 once),
//   <q, k>^ = sqrt(pi/2) / m * n * sum_i q'_i s_i
// (kvquant.h). The estimator stays exact over the f32 projected query: a key's row is its m signs
// as floats and the sum is an f32 dot product with q', not popcounts against a sign-quantized query
// (which would estimate something else). The signs expand through the 1-bit RaBitQ plane reader
// (ExpandPlanes<1>: bit 1 -> +1/2, bit 0 -> -1/2), which is -s_i / 2, so a key's factor is
// -2 sqrt(pi/2) n / m. The tasks, tiles and phases are rotated_attention-inl.h's, with rows of m
// floats on the key side.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/qjl_attention.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "cpu/simd.h"
#include "cpu/attention_tiles-inl.h"
#include "cpu/expand_codes-inl.h"
#include "cpu/rotated_attention-inl.h"

#include <cmath>
#include <numbers>
#include <span>

#include "cpu/cpu.h"
#include "kvquant/record.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {

// The key side of a QJL pool, as RotatedDecodeAttention reads it.
struct QjlCodes {
  const uint8_t* pages;
  int64_t record_bytes, sign_bytes;
  float factor;  // -2 sqrt(pi/2) / m: ExpandPlanes<1>'s -s_i / 2 back to s_i, and the estimator's constant

  QjlCodes(const Tensor& pool, const kvquant::QjlKeys& codec)
      : pages(pool.ptr<const uint8_t>()),
        record_bytes(codec.record_bytes()),
        sign_bytes(kvquant::packed_bytes(codec.config().sketch_dim, 1)),
        factor(float(-2.0 * std::sqrt(std::numbers::pi / 2.0) / double(codec.config().sketch_dim))) {}

  const uint8_t* Record(int64_t index) const { return pages + index * record_bytes; }
  float Norm(int64_t index) const { return detail::load_f32_le(Record(index)); }
  bool Valid(int64_t index) const { return detail::is_valid_norm(Norm(index)); }
  void Prefetch(int64_t index) const { PrefetchRecord(Record(index), record_bytes); }

  void CheckRecord(const detail::ArgCheck& check, const char* pool, int64_t b, int64_t t, int64_t h,
                   int64_t index) const {
    if (!Valid(index)) detail::fail_paged_record_norm(check, pool, b, t, h, Norm(index));
  }

  // Expands record `index` into -s / 2 (m floats, m a multiple of 16) and returns its factor.
  HWY_INLINE float Expand(int64_t index, int64_t m, float* HWY_RESTRICT row) const {
    ExpandPlanes<1>(Record(index) + detail::kNormBytes, sign_bytes, m, row);
    return factor * Norm(index);
  }
};

void QjlDecodeAttentionPaged(const QjlDecodeAttentionPagedArgs& a) {
  const kvquant::QjlKeys& k_codec = *a.cache.k_codec;
  const int64_t m = k_codec.config().sketch_dim, d = k_codec.config().head_dim;
  const std::span<const double> sketch = k_codec.sketch();
  // q' = S q in double, as the codec's own estimator projects it.
  const auto project = [&](std::span<const double> x, std::span<double> y) {
    for (int64_t i = 0; i < m; ++i) {
      double sum = 0.0;
      for (int64_t j = 0; j < d; ++j) sum += sketch[size_t(i * d + j)] * x[size_t(j)];
      y[size_t(i)] = sum;
    }
  };
  ProjectedDecodeAttention(a, QjlCodes(a.cache.k_pages, k_codec), m, project, *a.cache.v_codec);
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace decodelab::cpu {

HWY_EXPORT(QjlDecodeAttentionPaged);

void qjl_decode_attention_paged(const QjlDecodeAttentionPagedArgs& a) {
  HWY_DYNAMIC_DISPATCH(QjlDecodeAttentionPaged)(a);
}

}  // namespace decodelab::cpu
#endif  // HWY_ONCE
