// Per-target SIMD helpers for the CPU kernels (Google Highway): widening loads of f32, f16 and
// bf16 into f32 vectors and narrowing stores that round to nearest even. Include it after
// "hwy/highway.h" inside a file compiled once per target (foreach_target.h).
#if defined(DECODELAB_CPU_SIMD_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef DECODELAB_CPU_SIMD_H_
#undef DECODELAB_CPU_SIMD_H_
#else
#define DECODELAB_CPU_SIMD_H_
#endif

#include "cpu/element.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Lanes(df) values from p, widened to f32.
template <class D>
HWY_INLINE hn::Vec<D> LoadF32(D df, const float* HWY_RESTRICT p) {
  return hn::LoadU(df, p);
}
template <class D>
HWY_INLINE hn::Vec<D> LoadF32(D df, const hwy::float16_t* HWY_RESTRICT p) {
  const hn::Rebind<hwy::float16_t, D> dh;
  return hn::PromoteTo(df, hn::LoadU(dh, p));
}
template <class D>
HWY_INLINE hn::Vec<D> LoadF32(D df, const hwy::bfloat16_t* HWY_RESTRICT p) {
  const hn::Rebind<hwy::bfloat16_t, D> db;
  return hn::PromoteTo(df, hn::LoadU(db, p));
}

// Stores Lanes(df) f32 values to p, rounded to nearest even. (Highway's bf16 DemoteTo truncates,
// so bf16 rounds here by integer arithmetic; inputs are finite.)
template <class D>
HWY_INLINE void StoreF32(D df, hn::Vec<D> v, float* HWY_RESTRICT p) {
  hn::StoreU(v, df, p);
}
template <class D>
HWY_INLINE void StoreF32(D /*df*/, hn::Vec<D> v, hwy::float16_t* HWY_RESTRICT p) {
  const hn::Rebind<hwy::float16_t, D> dh;
  hn::StoreU(hn::DemoteTo(dh, v), dh, p);
}
template <class D>
HWY_INLINE void StoreF32(D /*df*/, hn::Vec<D> v, hwy::bfloat16_t* HWY_RESTRICT p) {
  const hn::RebindToSigned<D> di;
  const hn::Rebind<uint16_t, D> du16;
  const auto bits = hn::BitCast(di, v);
  const auto lsb = hn::And(hn::ShiftRight<16>(bits), hn::Set(di, 1));
  const auto rounded = hn::ShiftRight<16>(hn::Add(hn::Add(bits, hn::Set(di, 0x7FFF)), lsb));
  // Arithmetic shift sign-extends negative values: keep the low 16 bits before narrowing.
  const auto low = hn::And(rounded, hn::Set(di, 0xFFFF));
  hn::StoreU(hn::DemoteTo(du16, low), du16, reinterpret_cast<uint16_t*>(p));
}

// v, which the compiler must then hold in a register. GCC folds a load used by several FMAs into
// each of them as a memory operand; where loads are the narrower port (Zen 4 loads one 512-bit
// vector per cycle and retires one 512-bit FMA), a register-blocked loop then waits on loads.
template <class V>
HWY_INLINE V KeepInRegister(V v) {
#if HWY_ARCH_X86 && HWY_TARGET != HWY_EMU128 && HWY_TARGET != HWY_SCALAR && (HWY_COMPILER_GCC || HWY_COMPILER_CLANG)
  asm("" : "+v"(v.raw));
#endif
  return v;
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // DECODELAB_CPU_SIMD_H_
