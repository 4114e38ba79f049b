// Per-target RoPE helpers shared by the RoPE kernel and the fused QKV split/append kernels: the
// call's cos/sin table (one row per distinct position, shared by every head of every token at
// that position, Q and K alike) and the in-register rotation of one head from T to T. Include
// after "hwy/highway.h" in a file compiled once per target.
#if defined(DECODELAB_CPU_ROPE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef DECODELAB_CPU_ROPE_INL_H_
#undef DECODELAB_CPU_ROPE_INL_H_
#else
#define DECODELAB_CPU_ROPE_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/element.h"
#include "cpu/simd.h"
#include "cpu/thread_pool.h"
#include "decodelab/layers.h"
#include "hwy/aligned_allocator.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// The cos and sin of every rotary pair at every distinct position of one call. Angles are in
// double (positions reach 10^5, and an f32 angle would lose the phase), evaluated 8 (AVX-512) or
// 4 (AVX2) pairs at a time, and rounded to f32 once. A row holds `stride` cos values, then
// `stride` sin values, laid out for the rotation of the style:
//   half-split:  cos[i], sin[i] of pair i (i < rotary_dim / 2);
//   interleaved: cos[2i] = cos[2i + 1] = cos of pair i, sin[2i] = -sin, sin[2i + 1] = +sin, so
//                one vector rotates whole pairs against its Reverse2.
class RopeTable {
 public:
  template <class PositionOf>
  RopeTable(const RopeParams& p, int64_t tokens, PositionOf&& position_of)
      : style_(p.style), rotary_dim_(p.rotary_dim), half_(p.rotary_dim / 2) {
    // Token -> row of its position: sort the positions once, one row per distinct value.
    std::vector<int64_t> positions(static_cast<size_t>(tokens));
    for (int64_t t = 0; t < tokens; ++t) positions[size_t(t)] = position_of(t);
    std::vector<int64_t> distinct = positions;
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    row_of_.resize(positions.size());
    for (size_t t = 0; t < positions.size(); ++t) {
      row_of_[t] = std::lower_bound(distinct.begin(), distinct.end(), positions[t]) - distinct.begin();
    }

    const int64_t lanes = DoubleLanes();
    const int64_t padded_half = (half_ + lanes - 1) / lanes * lanes;
    const int64_t width = style_ == RopeStyle::half_split ? half_ : rotary_dim_;
    stride_ = (std::max(width, padded_half) + 15) / 16 * 16;  // whole 64-byte lines per half row
    inv_freq_.assign(static_cast<size_t>(padded_half), 0.0);  // padding pairs: angle 0, unused
    for (int64_t i = 0; i < half_; ++i) inv_freq_[size_t(i)] = rope_inv_frequency(p, rotary_dim_, int(i));

    const int64_t rows = int64_t(distinct.size());
    rows_ = hwy::AllocateAligned<float>(size_t(rows * 2 * stride_));
    const auto fill = [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) FillRow(distinct[size_t(r)], row(r));
    };
    if (rows * half_ < (int64_t{1} << 12)) {
      fill(0, rows);
    } else {
      parallel_ranges(rows, 1, fill);
    }
  }

  // Rotates one head of `d` values (token t) from x into out, which may be x: the first
  // rotary_dim values in f32 registers, rounded to T once; the rest copied.
  template <class T>
  void Rotate(const T* x, T* out, int64_t d, int64_t t) const {
    const float* HWY_RESTRICT c = row(row_of_[size_t(t)]);
    const float* HWY_RESTRICT s = c + stride_;
    const hn::ScalableTag<float> df;
    const int64_t N = int64_t(hn::Lanes(df));
    int64_t i = 0;
    if (style_ == RopeStyle::half_split) {
      // Each vector reads its lanes of both halves before it writes them, so out may alias x.
      for (; i + N <= half_; i += N) {
        const auto a = LoadF32(df, x + i), b = LoadF32(df, x + half_ + i);
        const auto cv = hn::LoadU(df, c + i), sv = hn::LoadU(df, s + i);
        StoreF32(df, hn::NegMulAdd(b, sv, hn::Mul(a, cv)), out + i);
        StoreF32(df, hn::MulAdd(a, sv, hn::Mul(b, cv)), out + half_ + i);
      }
      for (; i < half_; ++i) {
        const float a = to_f32(x[i]), b = to_f32(x[half_ + i]);
        out[i] = from_f32<T>(a * c[i] - b * s[i]);
        out[half_ + i] = from_f32<T>(b * c[i] + a * s[i]);
      }
    } else {
      // Lane 2i: a cos - b sin = a cos + b (-sin); lane 2i + 1: b cos + a sin. (A one-lane
      // target has no partner lane to swap with: it takes the scalar loop.)
      for (; N >= 2 && i + N <= rotary_dim_; i += N) {
        const auto v = LoadF32(df, x + i);
        StoreF32(df, hn::MulAdd(hn::Reverse2(df, v), hn::LoadU(df, s + i), hn::Mul(v, hn::LoadU(df, c + i))), out + i);
      }
      for (; i < rotary_dim_; i += 2) {
        const float a = to_f32(x[i]), b = to_f32(x[i + 1]);
        out[i] = from_f32<T>(a * c[i] + b * s[i]);
        out[i + 1] = from_f32<T>(b * c[i + 1] + a * s[i + 1]);
      }
    }
    if (out != x && d > rotary_dim_) std::memcpy(out + rotary_dim_, x + rotary_dim_, size_t(d - rotary_dim_) * sizeof(T));
  }

 private:
  static int64_t DoubleLanes() {
#if HWY_HAVE_FLOAT64
    return int64_t(hn::Lanes(hn::ScalableTag<double>()));
#else
    return 1;
#endif
  }

  float* row(int64_t r) const { return rows_.get() + r * 2 * stride_; }

  void FillRow(int64_t position, float* HWY_RESTRICT c) const {
    float* HWY_RESTRICT s = c + stride_;
#if HWY_HAVE_FLOAT64
    const hn::ScalableTag<double> dd;
    const hn::Rebind<float, decltype(dd)> df;
    const int64_t N = int64_t(hn::Lanes(dd));
    const auto pos = hn::Set(dd, double(position));
    for (int64_t i = 0; i < half_; i += N) {
      const auto angle = hn::Mul(pos, hn::LoadU(dd, inv_freq_.data() + i));
      hn::StoreU(hn::DemoteTo(df, hn::Cos(dd, angle)), df, c + i);
      hn::StoreU(hn::DemoteTo(df, hn::Sin(dd, angle)), df, s + i);
    }
#else
    for (int64_t i = 0; i < half_; ++i) {
      const double angle = double(position) * inv_freq_[size_t(i)];
      c[i] = float(std::cos(angle));
      s[i] = float(std::sin(angle));
    }
#endif
    if (style_ == RopeStyle::half_split) return;
    // Spread pair i to lanes 2i and 2i + 1, from the last pair down so no value is overwritten
    // before it is read.
    for (int64_t i = half_ - 1; i >= 0; --i) {
      const float cos_i = c[i], sin_i = s[i];
      c[2 * i] = c[2 * i + 1] = cos_i;
      s[2 * i] = -sin_i;
      s[2 * i + 1] = sin_i;
    }
  }

  RopeStyle style_;
  int64_t rotary_dim_, half_, stride_ = 0;
  std::vector<double> inv_freq_;
  std::vector<int64_t> row_of_;
  hwy::AlignedFreeUniquePtr<float[]> rows_;
};

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // DECODELAB_CPU_ROPE_INL_H_
