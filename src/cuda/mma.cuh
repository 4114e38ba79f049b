// Tensor-core pieces shared by the CUDA kernels: the m16n8k16 mma with f32 accumulation (f16 or
// bf16 operands), and 16-bit operand pairs (two elements in one 32-bit register, the lower index
// in the low half) made from floats, from 4-bit codes, or picked out of a row of elements.
//
// 4-bit codes become 16-bit values without a conversion instruction: a code q ORed under the
// exponent of 1024 (f16, 0x6400) or 128 (bf16, 0x4300) is exactly 1024 + q or 128 + q, and one
// masked OR places two codes 16 bits apart into one pair. Subtracting the magic (plus the code's
// zero point) is exact, so each pair costs a LOP3, a subtraction and one rounding multiply-add.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace decodelab::cuda {

// D += A B for one 16x16 (row-major A) by 16x8 (column-major B) tile, f32 accumulators.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats as one 32-bit register of T (the lower index in the low half).
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// The pair type of T and the bits of the magic that makes a 4-bit code a 16-bit value.
template <class T>
struct OperandPair;
template <>
struct OperandPair<__half> {
  using type = __half2;
  static constexpr uint32_t kMagic = 0x6400u;  // 1024.0; the unit in the last place is 1
};
template <>
struct OperandPair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x4300u;  // 128.0; the unit in the last place is 1
};

template <class T>
__device__ __forceinline__ typename OperandPair<T>::type as_pair(uint32_t bits) {
  return *reinterpret_cast<const typename OperandPair<T>::type*>(&bits);
}
template <class T>
__device__ __forceinline__ uint32_t as_bits(typename OperandPair<T>::type v) {
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <class T>
__device__ __forceinline__ typename OperandPair<T>::type splat(T v) {
  return typename OperandPair<T>::type(v, v);
}

// An f16 scale (GGUF's d) as T.
template <class T>
__device__ __forceinline__ T to_operand(__half v) {
  if constexpr (std::is_same_v<T, __half>) {
    return v;
  } else {
    return __float2bfloat16_rn(__half2float(v));
  }
}

// The pair (magic + offset, magic + offset) from its bits (no conversion instruction), offset < 16.
template <class T, uint32_t kOffset>
__device__ __forceinline__ typename OperandPair<T>::type magic_pair() {
  return as_pair<T>((OperandPair<T>::kMagic | kOffset) * 0x10001u);
}

// The codes at bits [0, 4) and [16, 20) of `word` as the pair (q0, q1) + magic.
template <class T>
__device__ __forceinline__ typename OperandPair<T>::type nibble_pair(uint32_t word) {
  return as_pair<T>((word & 0x000F000Fu) | (OperandPair<T>::kMagic * 0x10001u));
}

// MLX affine: scale * q + bias for the two codes at bits [0, 4) and [16, 20).
template <class T>
__device__ __forceinline__ uint32_t affine_nibbles(uint32_t word, T scale, T bias) {
  return as_bits<T>(__hfma2(__hsub2(nibble_pair<T>(word), magic_pair<T, 0>()), splat(scale), splat(bias)));
}

// GGUF Q4_0: d * (q - 8) for the two codes at bits [0, 4) and [16, 20).
template <class T>
__device__ __forceinline__ uint32_t centered_nibbles(uint32_t word, T d) {
  return as_bits<T>(__hmul2(__hsub2(nibble_pair<T>(word), magic_pair<T, 8>()), splat(d)));
}

// Elements i0 and i1 of a row of 16-bit elements held as 32-bit words (element 2w in the low half
// of word w) as one pair: a byte permute, or the word itself when the two are neighbours.
template <int kI0, int kI1, int kWords>
__device__ __forceinline__ uint32_t select_pair(const uint32_t (&words)[kWords]) {
  if constexpr (kI0 % 2 == 0 && kI1 == kI0 + 1) {
    return words[kI0 / 2];
  } else {
    constexpr uint32_t kSelect = (kI0 % 2 ? 0x32u : 0x10u) | (kI1 % 2 ? 0x7600u : 0x5400u);
    return __byte_perm(words[kI0 / 2], words[kI1 / 2], kSelect);
  }
}

}  // namespace decodelab::cuda
