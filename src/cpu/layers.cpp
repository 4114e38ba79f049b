// CPU RMSNorm, residual add, bias add, RMSNorm + residual, SwiGLU and RoPE: one pass over the
// activations, f32 arithmetic in SIMD registers, rows spread over the thread pool when there are
// enough.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/layers.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "cpu/simd.h"
#include "cpu/rope-inl.h"

#include <cmath>
#include <vector>

#include "cpu/cpu.h"
#include "cpu/element.h"
#include "cpu/thread_pool.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Rows of `hidden` elements: split over threads once there is enough work to pay for it.
template <class Fn>
void for_rows(int64_t rows, int64_t hidden, Fn&& fn) {
  if (rows * hidden < (int64_t{1} << 16)) {
    fn(int64_t{0}, rows);
  } else {
    parallel_ranges(rows, 1, fn);
  }
}

// Flat elementwise loops: chunks of 16K elements over the pool.
template <class Fn>
void for_elements(int64_t n, Fn&& fn) {
  if (n < (int64_t{1} << 16)) {
    fn(int64_t{0}, n);
  } else {
    parallel_ranges(n, int64_t{1} << 14, fn);
  }
}

template <class T>
float SumSquares(const T* HWY_RESTRICT x, int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t N = int64_t(hn::Lanes(df));
  auto acc0 = hn::Zero(df), acc1 = hn::Zero(df);
  int64_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    const auto a = LoadF32(df, x + i), b = LoadF32(df, x + i + N);
    acc0 = hn::MulAdd(a, a, acc0);
    acc1 = hn::MulAdd(b, b, acc1);
  }
  float sum = hn::GetLane(hn::SumOfLanes(df, hn::Add(acc0, acc1)));
  for (; i < n; ++i) sum += to_f32(x[i]) * to_f32(x[i]);
  return sum;
}

// out = x * inv_rms * w for one row.
template <class T>
void ScaleRow(const T* HWY_RESTRICT x, const T* HWY_RESTRICT w, float inv_rms, T* HWY_RESTRICT out, int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t N = int64_t(hn::Lanes(df));
  const auto scale = hn::Set(df, inv_rms);
  int64_t i = 0;
  for (; i + N <= n; i += N) StoreF32(df, hn::Mul(hn::Mul(LoadF32(df, x + i), scale), LoadF32(df, w + i)), out + i);
  for (; i < n; ++i) out[i] = from_f32<T>(to_f32(x[i]) * inv_rms * to_f32(w[i]));
}

void RmsNorm(const RmsNormArgs& a) {
  dispatch_activation(a.x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t hidden = a.x.dim(a.x.rank - 1), rows = a.x.numel() / hidden;
    const T* x = a.x.ptr<const T>();
    const T* w = a.weight.ptr<const T>();
    T* out = a.out.ptr<T>();
    for_rows(rows, hidden, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float inv_rms = 1.0f / std::sqrt(SumSquares(x + r * hidden, hidden) / float(hidden) + a.eps);
        ScaleRow(x + r * hidden, w, inv_rms, out + r * hidden, hidden);
      }
    });
  });
}

// out[i] = a[i] + b[i] for i < n, rounded once. Not HWY_RESTRICT: out may alias a or b, and each
// element is read before it is written.
template <class T>
void AddRow(const T* a, const T* b, T* out, int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t N = int64_t(hn::Lanes(df));
  int64_t i = 0;
  for (; i + N <= n; i += N) StoreF32(df, hn::Add(LoadF32(df, a + i), LoadF32(df, b + i)), out + i);
  for (; i < n; ++i) out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

void ResidualAdd(const ResidualAddArgs& args) {
  dispatch_activation(args.a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* a = args.a.ptr<const T>();
    const T* b = args.b.ptr<const T>();
    T* out = args.out.ptr<T>();
    for_elements(args.out.numel(),
                 [&](int64_t begin, int64_t end) { AddRow(a + begin, b + begin, out + begin, end - begin); });
  });
}

// The same add per row, against the one bias row (it stays in L1 across rows).
void BiasAdd(const BiasAddArgs& args) {
  dispatch_activation(args.x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t n = args.bias.numel(), rows = args.x.numel() / n;
    const T* x = args.x.ptr<const T>();
    const T* bias = args.bias.ptr<const T>();
    T* out = args.out.ptr<T>();
    for_rows(rows, n, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) AddRow(x + r * n, bias, out + r * n, n);
    });
  });
}

void RmsNormResidual(const RmsNormResidualArgs& a) {
  dispatch_activation(a.x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t hidden = a.x.dim(a.x.rank - 1), rows = a.x.numel() / hidden;
    const T* x = a.x.ptr<const T>();
    const T* w = a.weight.ptr<const T>();
    T* residual = a.residual.ptr<T>();
    T* out = a.out.ptr<T>();
    for_rows(rows, hidden, [&](int64_t begin, int64_t end) {
      const hn::ScalableTag<float> df;
      const int64_t N = int64_t(hn::Lanes(df));
      for (int64_t r = begin; r < end; ++r) {
        T* h = residual + r * hidden;
        const T* xr = x + r * hidden;
        // The sum is stored first and the norm reads it back as stored (rounded), like the
        // reference: each pair of vectors is read back from L1 right after its store and squared
        // into the same two accumulators, in the same order, as SumSquares would in a second pass.
        auto acc0 = hn::Zero(df), acc1 = hn::Zero(df);
        int64_t i = 0;
        for (; i + 2 * N <= hidden; i += 2 * N) {
          StoreF32(df, hn::Add(LoadF32(df, xr + i), LoadF32(df, h + i)), h + i);
          StoreF32(df, hn::Add(LoadF32(df, xr + i + N), LoadF32(df, h + i + N)), h + i + N);
          const auto s0 = LoadF32(df, h + i), s1 = LoadF32(df, h + i + N);
          acc0 = hn::MulAdd(s0, s0, acc0);
          acc1 = hn::MulAdd(s1, s1, acc1);
        }
        float sum_squares = hn::GetLane(hn::SumOfLanes(df, hn::Add(acc0, acc1)));
        for (int64_t j = i; j < hidden; ++j) {
          h[j] = from_f32<T>(to_f32(xr[j]) + to_f32(h[j]));
          sum_squares += to_f32(h[j]) * to_f32(h[j]);
        }
        const float inv_rms = 1.0f / std::sqrt(sum_squares / float(hidden) + a.eps);
        ScaleRow(h, w, inv_rms, out + r * hidden, hidden);
      }
    });
  });
}

// silu(g) = g / (1 + e^-g) on one vector of f32, with about 25 vector operations and no divide
// (Highway's Exp and a Div cost 1.5x that on Zen 4, whose FMA pipes bind here):
//  - e^-g by the usual reduction: n = round(-g / ln 2) by adding 1.5 * 2^23 (its low mantissa
//    bits are then n, ready to shift into an exponent), r = -g - n ln 2 in one FMA (f32 ln 2 is
//    off by 1.9e-9, so |error| <= 1.9e-9 |n|), e^r by a degree-6 minimax polynomial on
//    [-ln 2 / 2, ln 2 / 2] (7e-8 relative in f32 Horner), times 2^n through the exponent bits;
//  - 1 / (1 + e^-g) as a reciprocal estimate and one Newton step (~1 ulp).
// g is clamped to [-86, 86] inside the exp so that 2^n stays a normal f32: past +86, 1 + e^-g is 1
// in f32 anyway; past -86, silu is below 1e-35 in magnitude.
template <class D>
HWY_INLINE hn::Vec<D> Silu(D df, hn::Vec<D> g) {
  const hn::RebindToSigned<D> di;
  const auto round_bias = hn::Set(df, 12582912.0f);  // 1.5 * 2^23
  const auto gc = hn::Min(hn::Max(g, hn::Set(df, -86.0f)), hn::Set(df, 86.0f));
  const auto biased_n = hn::MulAdd(gc, hn::Set(df, -1.44269504088896341f), round_bias);
  const auto n = hn::Sub(biased_n, round_bias);
  const auto r = hn::NegMulSub(n, hn::Set(df, 0.693147182464599609375f), gc);  // -g - n ln 2
  auto p = hn::Set(df, 0.0013836845755577087f);
  p = hn::MulAdd(p, r, hn::Set(df, 0.008374815806746483f));
  p = hn::MulAdd(p, r, hn::Set(df, 0.04166822507977486f));
  p = hn::MulAdd(p, r, hn::Set(df, 0.16666419804096222f));
  p = hn::MulAdd(p, r, hn::Set(df, 0.49999991059303284f));
  p = hn::MulAdd(p, r, hn::Set(df, 1.0f));
  p = hn::MulAdd(p, r, hn::Set(df, 1.0f));
  const auto pow2_n = hn::ShiftLeft<23>(hn::BitCast(di, biased_n));  // n << 23: the bias shifts out
  const auto den = hn::Add(hn::BitCast(df, hn::Add(hn::BitCast(di, p), pow2_n)), hn::Set(df, 1.0f));
  auto inv = hn::ApproximateReciprocal(den);
  inv = hn::Mul(inv, hn::NegMulAdd(den, inv, hn::Set(df, 2.0f)));
  return hn::Mul(g, inv);
}

// out = silu(gate) * up: each of the three streams read or written once, one Silu per vector; the
// only scalar work is the tail of the whole tensor (chunks are multiples of 16K elements), and it
// goes through the same vector Silu.
void Swiglu(const SwigluArgs& args) {
  dispatch_activation(args.gate.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* gate = args.gate.ptr<const T>();
    const T* up = args.up.ptr<const T>();
    T* out = args.out.ptr<T>();
    for_elements(args.out.numel(), [&](int64_t begin, int64_t end) {
      const hn::ScalableTag<float> df;
      const int64_t N = int64_t(hn::Lanes(df));
      int64_t i = begin;
      for (; i + N <= end; i += N) {
        StoreF32(df, hn::Mul(Silu(df, LoadF32(df, gate + i)), LoadF32(df, up + i)), out + i);
      }
      if (i == end) return;
      // The tail, through a zero-padded vector so it rounds exactly as the body does.
      HWY_ALIGN float g[hn::MaxLanes(df)] = {}, u[hn::MaxLanes(df)] = {}, o[hn::MaxLanes(df)];
      for (int64_t j = i; j < end; ++j) g[j - i] = to_f32(gate[j]), u[j - i] = to_f32(up[j]);
      hn::Store(hn::Mul(Silu(df, hn::Load(df, g)), hn::Load(df, u)), df, o);
      for (int64_t j = i; j < end; ++j) out[j] = from_f32<T>(o[j - i]);
    });
  });
}

// One table row per distinct position, then rows of (token, head) over the pool: a decode batch
// of few tokens still splits by head.
void Rope(const RopeArgs& a) {
  dispatch_activation(a.x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t d = a.x.dim(a.x.rank - 1), heads = a.x.dim(a.x.rank - 2);
    const int64_t tokens = a.x.numel() / (heads * d);
    const int32_t* positions = a.positions.ptr<const int32_t>();
    const RopeTable table(a.params, tokens, [&](int64_t t) { return int64_t(positions[t]); });
    const T* x = a.x.ptr<const T>();
    T* out = a.out.ptr<T>();
    for_rows(tokens * heads, d, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) table.Rotate(x + r * d, out + r * d, d, r / heads);
    });
  });
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace decodelab::cpu {

HWY_EXPORT(RmsNorm);
HWY_EXPORT(ResidualAdd);
HWY_EXPORT(BiasAdd);
HWY_EXPORT(RmsNormResidual);
HWY_EXPORT(Swiglu);
HWY_EXPORT(Rope);

void rms_norm(const RmsNormArgs& a) { HWY_DYNAMIC_DISPATCH(RmsNorm)(a); }
void residual_add(const ResidualAddArgs& a) { HWY_DYNAMIC_DISPATCH(ResidualAdd)(a); }
void bias_add(const BiasAddArgs& a) { HWY_DYNAMIC_DISPATCH(BiasAdd)(a); }
void rms_norm_residual(const RmsNormResidualArgs& a) { HWY_DYNAMIC_DISPATCH(RmsNormResidual)(a); }
void swiglu(const SwigluArgs& a) { HWY_DYNAMIC_DISPATCH(Swiglu)(a); }
void rope(const RopeArgs& a) { HWY_DYNAMIC_DISPATCH(Rope)(a); }

}  // namespace decodelab::cpu
#endif  // HWY_ONCE
