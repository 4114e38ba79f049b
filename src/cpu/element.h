// Element types of the CPU kernels and the one runtime->compile-time dtype dispatch they share.
#pragma once

#include "decodelab/dtype.h"
#include "decodelab/error.h"
#include "hwy/base.h"

namespace decodelab::cpu {

// Scalar widening and rounding narrowing, for loop tails.
inline float to_f32(float v) { return v; }
inline float to_f32(hwy::float16_t v) { return f16_to_f32(v.bits); }
inline float to_f32(hwy::bfloat16_t v) { return bf16_to_f32(v.bits); }

template <class T>
inline T from_f32(float v);
template <>
inline float from_f32<float>(float v) { return v; }
template <>
inline hwy::float16_t from_f32<hwy::float16_t>(float v) {
  hwy::float16_t h;
  h.bits = f32_to_f16(v);
  return h;
}
template <>
inline hwy::bfloat16_t from_f32<hwy::bfloat16_t>(float v) {
  hwy::bfloat16_t b;
  b.bits = f32_to_bf16(v);
  return b;
}

// Calls fn(T{}) with T the element type of an activation dtype (float, hwy::float16_t or
// hwy::bfloat16_t). The ops layer has validated the dtype already.
template <class Fn>
decltype(auto) dispatch_activation(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f16: return fn(hwy::float16_t{});
    case DType::bf16: return fn(hwy::bfloat16_t{});
    case DType::f32: return fn(float{});
    default: fail("cpu backend", "dtype", "f32, f16 or bf16", dtype_name(dtype));
  }
}

}  // namespace decodelab::cpu
