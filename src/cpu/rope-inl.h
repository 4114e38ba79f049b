// Per-target RoPE helpers shared by the RoPE kernel and the fused QKV split/append kernels:
// the per-token cos/sin tables and the in-register rotation of one head. Include after
// "hwy/highway.h" in a file compiled once per target.
#if defined(DECODELAB_CPU_ROPE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef DECODELAB_CPU_ROPE_INL_H_
#undef DECODELAB_CPU_ROPE_INL_H_
#else
#define DECODELAB_CPU_ROPE_INL_H_
#endif

#include <cmath>
#include <vector>

#include "decodelab/layers.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// The inverse frequency of every rotary pair (Llama 3 scaling included), once per call.
inline std::vector<double> rope_inv_frequencies(const RopeParams& p) {
  std::vector<double> inv_freq(static_cast<size_t>(p.rotary_dim / 2));
  for (size_t i = 0; i < inv_freq.size(); ++i) inv_freq[i] = rope_inv_frequency(p, p.rotary_dim, int(i));
  return inv_freq;
}

// cos and sin of every pair's angle at `position`. Angles in double: positions reach 10^5 and an
// f32 angle would lose the phase.
inline void rope_angles(const std::vector<double>& inv_freq, int64_t position, float* cos_v, float* sin_v) {
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    const double angle = double(position) * inv_freq[i];
    cos_v[i] = float(std::cos(angle));
    sin_v[i] = float(std::sin(angle));
  }
}

// Rotates one head in place on f32 values: half-split pairs (i, i + half) in vectors,
// interleaved pairs (2i, 2i + 1) with the partner lanes swapped by Reverse2.
inline void RotateHead(float* HWY_RESTRICT head, const float* HWY_RESTRICT cos_v, const float* HWY_RESTRICT sin_v,
                const RopeParams& p) {
  const hn::ScalableTag<float> df;
  const int64_t N = int64_t(hn::Lanes(df));
  const int64_t half = p.rotary_dim / 2;
  if (p.style == RopeStyle::half_split) {
    int64_t i = 0;
    for (; i + N <= half; i += N) {
      const auto a = hn::LoadU(df, head + i), b = hn::LoadU(df, head + half + i);
      const auto c = hn::LoadU(df, cos_v + i), s = hn::LoadU(df, sin_v + i);
      hn::StoreU(hn::NegMulAdd(b, s, hn::Mul(a, c)), df, head + i);
      hn::StoreU(hn::MulAdd(a, s, hn::Mul(b, c)), df, head + half + i);
    }
    for (; i < half; ++i) {
      const float a = head[i], b = head[half + i];
      head[i] = a * cos_v[i] - b * sin_v[i];
      head[half + i] = b * cos_v[i] + a * sin_v[i];
    }
    return;
  }
  for (int64_t i = 0; i < half; ++i) {
    const float a = head[2 * i], b = head[2 * i + 1];
    head[2 * i] = a * cos_v[i] - b * sin_v[i];
    head[2 * i + 1] = b * cos_v[i] + a * sin_v[i];
  }
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // DECODELAB_CPU_ROPE_INL_H_
