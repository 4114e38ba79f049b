// Element access for the reference kernels: any float dtype in, double out, and back with one
// correct rounding. Reference kernels index contiguous tensors by flat element offset.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "decodelab/dtype.h"
#include "decodelab/layers.h"
#include "decodelab/tensor.h"

namespace decodelab::reference {

inline double load(const Tensor& t, int64_t i) {
  switch (t.dtype) {
    case DType::f32: return t.ptr<const float>()[i];
    case DType::f16: return f16_to_f32(t.ptr<const uint16_t>()[i]);
    case DType::bf16: return bf16_to_f32(t.ptr<const uint16_t>()[i]);
    case DType::f64: return t.ptr<const double>()[i];
    case DType::i32: return t.ptr<const int32_t>()[i];
    default: return std::nan("");
  }
}

inline int64_t load_index(const Tensor& t, int64_t i) { return t.ptr<const int32_t>()[i]; }

// double -> f32 rounding to odd: f32 keeps 13+ more bits than f16 and bf16 keeps 8 fewer than
// f32, so narrowing this result once more with round-to-nearest-even rounds the double correctly
// (no double rounding).
inline float round_to_odd_f32(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) == v || std::isnan(v)) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);  // truncate
  return std::bit_cast<float>(std::bit_cast<uint32_t>(f) | 1u);
}

inline void store(const Tensor& t, int64_t i, double v) {
  switch (t.dtype) {
    case DType::f32: t.ptr<float>()[i] = static_cast<float>(v); break;
    case DType::f16: t.ptr<uint16_t>()[i] = f32_to_f16(round_to_odd_f32(v)); break;
    case DType::bf16: t.ptr<uint16_t>()[i] = f32_to_bf16(round_to_odd_f32(v)); break;
    case DType::f64: t.ptr<double>()[i] = v; break;
    default: break;
  }
}

// The value `v` takes when stored in `dtype`: the reference rounds its intermediates where an
// implementation must store them (e.g. activations between the ops of a block).
inline double round_to(DType dtype, double v) {
  switch (dtype) {
    case DType::f32: return static_cast<float>(v);
    case DType::f16: return f16_to_f32(f32_to_f16(round_to_odd_f32(v)));
    case DType::bf16: return bf16_to_f32(f32_to_bf16(round_to_odd_f32(v)));
    default: return v;
  }
}

inline std::vector<double> load_all(const Tensor& t) {
  std::vector<double> out(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) out[size_t(i)] = load(t, i);
  return out;
}

// Rotates the first params.rotary_dim features of one head in place (defined in layers.cpp).
void rotate_head(double* head, int64_t position, const RopeParams& params);

}  // namespace decodelab::reference
