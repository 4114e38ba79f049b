// The weight formats of the CUDA matvecs (matvec.cu on CUDA cores, matvec_mma.cu on tensor cores):
// dense f32/f16/bf16, MLX affine 4/8-bit and GGUF Q4_0/Q8_0, each as how a lane loads one "unit"
// of a row (16 bytes of dense or MLX codes, one 18- or 34-byte GGUF block) and how it turns the
// unit into weights: f32 values in input order (decode), or 16-bit operand pairs for the tensor
// cores (pairs, with pair_input saying which two inputs of the unit each pair holds).
//
// Quantized codes become floats without an int->float conversion (a quarter-rate instruction on
// Hopper): code q is moved under the mantissa of 1.0f, giving m = 1 + q / 2^bits exactly, and each
// weight is one FMA, w = S * m + B', with S = 2^bits * scale and B' = bias - S (MLX), or for GGUF
// S = 2^bits * d and B' = -(2^bits + 2^(bits-1)) d (w = d (q - 8) for Q4_0; Q8_0's signed codes are
// first flipped to q + 128). The 16-bit pairs use the same idea at 16 bits (mma.cuh).
#pragma once

#include <span>
#include <type_traits>
#include <utility>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "ops/args.h"

namespace decodelab::cuda {
namespace {

// Generic pairs: the unit decoded to f32 in input order, neighbours packed (rounded to T).
template <class T, class M, class Raw>
__device__ __forceinline__ void natural_pairs(const M& m, const Raw& raw, uint32_t (&out)[M::kUnit / 2]) {
  float w[M::kUnit];
  m.decode(raw, w);
#pragma unroll
  for (int i = 0; i < M::kUnit / 2; ++i) out[i] = pack2(w[2 * i], w[2 * i + 1], T{});
}

// Code q of `bits` bits at bit `pos` of a word, as the float 1 + q / 2^bits.
template <int kBits, int kPos>
__device__ __forceinline__ float code_mantissa(uint32_t word) {
  constexpr int kTop = 23 - kBits;  // the code's place in the mantissa
  constexpr uint32_t kMask = ((1u << kBits) - 1) << kTop;
  const uint32_t moved = kPos <= kTop ? word << (kTop - kPos) : word >> (kPos - kTop);
  return __uint_as_float((moved & kMask) | 0x3F800000u);
}

// Where a format reads its bytes: global memory (streamed past L1, scales through the read-only
// cache), or a shared-memory stage that cp.async copies filled (matvec_staged.cu).
enum class Source { global, shared };

template <Source S, class V>
__device__ __forceinline__ V read_stream(const V* p) {
  if constexpr (S == Source::global) {
    return __ldcs(p);
  } else {
    return *p;
  }
}
template <Source S, class V>
__device__ __forceinline__ V read_cached(const V* p) {
  if constexpr (S == Source::global) {
    return __ldg(p);
  } else {
    return *p;
  }
}

// ------------------------------------------------------------------------------------------------
// Weight formats. Each has kUnit (inputs per lane per step), Raw (a unit as loaded), load() (issues
// the unit's loads), decode() (Raw to kUnit f32 weights in input order) and kUnroll (units loaded
// ahead per lane: about 64 bytes in flight). For the staged kernel (matvec_staged.cu) each also says
// how a tile's rows are copied into shared memory: kUnitBytes (bytes of a unit in the row's main
// array), unit_ptr() (where unit u of a row starts), side bytes (MLX's scales and biases, copied
// once per tile) and staged(), the same format reading a stage in shared memory.

template <class TW, Source S = Source::global>
struct DenseMatrix {
  static constexpr int kUnit = kVec<TW>, kUnroll = 4, kUnitBytes = 16;
  struct Raw {
    uint4 v;
  };
  const TW* w;
  int64_t k;

  __device__ Raw load(int64_t row, int64_t u) const {
    return {read_stream<S>(reinterpret_cast<const uint4*>(w + row * k) + u)};
  }

  static constexpr int kSideArrays = 0;
  __device__ const uint8_t* unit_ptr(int64_t row, int64_t u) const {
    return reinterpret_cast<const uint8_t*>(w + row * k + u * kUnit);
  }
  __host__ __device__ int64_t side_bytes(int64_t /*rows*/) const { return 0; }
  __device__ const uint8_t* side_ptr(int /*array*/, int64_t /*row0*/) const { return nullptr; }
  __device__ DenseMatrix<TW, Source::shared> staged(const uint8_t* stage, int64_t units, const uint8_t* /*side*/,
                                                    int64_t /*u0*/, int64_t /*tile_rows*/) const {
    return {reinterpret_cast<const TW*>(stage), units * kUnit};
  }
  __device__ void decode(const Raw& raw, float (&out)[kUnit]) const {
    const TW* e = reinterpret_cast<const TW*>(&raw.v);
#pragma unroll
    for (int i = 0; i < kUnit; ++i) out[i] = to_float(e[i]);
  }

  // Weights already in the operand type are already pairs.
  template <class T>
  __device__ void pairs(const Raw& raw, uint32_t (&out)[kUnit / 2]) const {
    if constexpr (std::is_same_v<T, TW>) {
      const uint32_t words[4] = {raw.v.x, raw.v.y, raw.v.z, raw.v.w};
#pragma unroll
      for (int i = 0; i < kUnit / 2; ++i) out[i] = words[i];
    } else {
      natural_pairs<T>(*this, raw, out);
    }
  }
  __host__ __device__ static constexpr int pair_input(int p, int h) { return 2 * p + h; }
};

// MLX affine: 16 bytes of codes (32 4-bit or 16 8-bit), all in one group (groups are >= 32 inputs).
template <int kBits, class TS, Source S = Source::global>
struct MlxMatrix {
  static constexpr int kCodes = 32 / kBits;  // per word
  static constexpr int kUnit = 4 * kCodes, kUnroll = 4, kUnitBytes = 16;
  struct Raw {
    uint4 v;
    TS scale, bias;
  };
  const uint4* packed;  // rows of row_units uint4
  const TS* scales;     // rows of row_groups, as biases
  const TS* biases;
  int64_t row_units, row_groups;
  int64_t first_unit;  // of `packed` in its row (a stage's start; 0 in global memory)
  int group_shift;     // log2 of the group size

  __device__ Raw load(int64_t row, int64_t u) const {
    const int64_t g = row * row_groups + (((first_unit + u) * kUnit) >> group_shift);
    return {read_stream<S>(packed + row * row_units + u), read_cached<S>(scales + g), read_cached<S>(biases + g)};
  }

  // The side arrays: the scales (0) and the biases (1) of a tile, each copied whole.
  static constexpr int kSideArrays = 2;
  __device__ const uint8_t* unit_ptr(int64_t row, int64_t u) const {
    return reinterpret_cast<const uint8_t*>(packed + row * row_units + u);
  }
  // Bytes of one side array over `rows` rows.
  __host__ __device__ int64_t side_bytes(int64_t rows) const { return rows * row_groups * int64_t(sizeof(TS)); }
  __device__ const uint8_t* side_ptr(int array, int64_t row0) const {
    return reinterpret_cast<const uint8_t*>((array == 0 ? scales : biases) + row0 * row_groups);
  }
  // A stage of `units` units per row starting at unit u0 of the rows, over the tile's side copy
  // (the scales of tile_rows rows, then their biases).
  __device__ MlxMatrix<kBits, TS, Source::shared> staged(const uint8_t* stage, int64_t units, const uint8_t* side,
                                                         int64_t u0, int64_t tile_rows) const {
    const TS* s = reinterpret_cast<const TS*>(side);
    return {reinterpret_cast<const uint4*>(stage), s, s + tile_rows * row_groups, units, row_groups, u0, group_shift};
  }
  __device__ void decode(const Raw& raw, float (&out)[kUnit]) const {
    const float s = to_float(raw.scale) * float(1 << kBits), b = to_float(raw.bias) - s;
    const uint32_t words[4] = {raw.v.x, raw.v.y, raw.v.z, raw.v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      decode_word(words[j], s, b, out + j * kCodes, std::make_integer_sequence<int, kCodes>());
    }
  }
  template <int... kI>
  __device__ static void decode_word(uint32_t word, float s, float b, float* out, std::integer_sequence<int, kI...>) {
    ((out[kI] = fmaf(s, code_mantissa<kBits, kI * kBits>(word), b)), ...);
  }

  // 4-bit codes straight to 16-bit pairs: nibbles s and s + 4 of each word (inputs 8j + s and
  // 8j + s + 4) in one pair, scaled in packed 16-bit arithmetic (scales and biases are in T).
  template <class T>
  __device__ void pairs(const Raw& raw, uint32_t (&out)[kUnit / 2]) const {
    if constexpr (kBits == 4) {
      const uint32_t words[4] = {raw.v.x, raw.v.y, raw.v.z, raw.v.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int s = 0; s < 4; ++s) out[4 * j + s] = affine_nibbles<T>(words[j] >> (4 * s), raw.scale, raw.bias);
      }
    } else {
      natural_pairs<T>(*this, raw, out);
    }
  }
  __host__ __device__ static constexpr int pair_input(int p, int h) { return kBits == 4 ? 8 * (p / 4) + p % 4 + 4 * h : 2 * p + h; }
};

// GGUF Q4_0 (18-byte blocks: f16 d, then byte j holds element j low and j + 16 high) and Q8_0
// (34-byte blocks: f16 d, then 32 int8). Blocks are only 2-byte aligned, so a lane reads the 8-byte
// words that cover its block and shifts the bytes into place in registers: 3 or 5 loads per block
// instead of 9 or 17 two-byte ones.
template <bool kQ8, Source S = Source::global>
struct GgufMatrix {
  static constexpr int kUnit = 32;
  static constexpr int kBits = kQ8 ? 8 : 4;
  static constexpr int64_t kBlockBytes = kQ8 ? 34 : 18;
  static constexpr int kLoadWords = int(kBlockBytes + 6 + 7) / 8;  // 8-byte words from the block's aligned start
  static constexpr int kUnroll = kQ8 ? 2 : 4;
  static constexpr int kUnitBytes = int(kBlockBytes);
  struct Raw {
    uint64_t w[kLoadWords];
    int shift;  // bits from the aligned start to the block
  };
  const uint8_t* packed;
  const uint8_t* end;  // past the last block of the matrix: words reaching past it are read in halves
  int64_t row_bytes;

  __device__ Raw load(int64_t row, int64_t u) const {
    const uint8_t* block = packed + row * row_bytes + u * kBlockBytes;
    const uintptr_t at = reinterpret_cast<uintptr_t>(block);
    const uint64_t* words = reinterpret_cast<const uint64_t*>(at & ~uintptr_t(7));
    Raw raw;
    raw.shift = int(at & 7) * 8;
#pragma unroll
    for (int i = 0; i < kLoadWords; ++i) {
      const uint8_t* word = reinterpret_cast<const uint8_t*>(words + i);
      if (word + 8 <= end) {
        raw.w[i] = read_stream<S>(words + i);
      } else {
        raw.w[i] = 0;  // the last block of the matrix: no reads past its end
        for (int h = 0; h < 4 && word + 2 * h < end; ++h) {
          raw.w[i] |= uint64_t(read_cached<S>(reinterpret_cast<const uint16_t*>(word) + h)) << (16 * h);
        }
      }
    }
    return raw;
  }

  static constexpr int kSideArrays = 0;
  __device__ const uint8_t* unit_ptr(int64_t row, int64_t u) const { return packed + row * row_bytes + u * kBlockBytes; }
  __host__ __device__ int64_t side_bytes(int64_t /*rows*/) const { return 0; }
  __device__ const uint8_t* side_ptr(int /*array*/, int64_t /*row0*/) const { return nullptr; }
  // A stage of `units` blocks per row (tile_rows rows): its 8-byte words all lie inside the stage.
  __device__ GgufMatrix<kQ8, Source::shared> staged(const uint8_t* stage, int64_t units, const uint8_t* /*side*/,
                                                    int64_t /*u0*/, int64_t tile_rows) const {
    return {stage, stage + tile_rows * units * kBlockBytes, units * kBlockBytes};
  }

  // The block's bytes from its start, as 32-bit words: bytes [0, 2) d, then the codes.
  __device__ static void block_words(const Raw& raw, uint32_t (&bytes)[kLoadWords * 2]) {
#pragma unroll
    for (int i = 0; i < kLoadWords; ++i) {
      const uint64_t next = i + 1 < kLoadWords ? raw.w[i + 1] : 0;
      const uint64_t v = raw.shift == 0 ? raw.w[i] : (raw.w[i] >> raw.shift) | (next << (64 - raw.shift));
      bytes[2 * i] = uint32_t(v);
      bytes[2 * i + 1] = uint32_t(v >> 32);
    }
  }

  __device__ void decode(const Raw& raw, float (&out)[kUnit]) const {
    uint32_t bytes[kLoadWords * 2];
    block_words(raw, bytes);
    const float d = __half2float(__ushort_as_half(uint16_t(bytes[0])));
    const float s = d * float(1 << kBits), b = -1.5f * s;
#pragma unroll
    for (int j = 0; j < (kQ8 ? 8 : 4); ++j) {
      uint32_t codes = __funnelshift_r(bytes[j], bytes[j + 1], 16);  // bytes [2 + 4j, 6 + 4j)
      if constexpr (kQ8) {
        codes ^= 0x80808080u;  // int8 q to q + 128
        out[4 * j + 0] = fmaf(s, code_mantissa<8, 0>(codes), b);
        out[4 * j + 1] = fmaf(s, code_mantissa<8, 8>(codes), b);
        out[4 * j + 2] = fmaf(s, code_mantissa<8, 16>(codes), b);
        out[4 * j + 3] = fmaf(s, code_mantissa<8, 24>(codes), b);
      } else {
        out[4 * j + 0] = fmaf(s, code_mantissa<4, 0>(codes), b);
        out[4 * j + 1] = fmaf(s, code_mantissa<4, 8>(codes), b);
        out[4 * j + 2] = fmaf(s, code_mantissa<4, 16>(codes), b);
        out[4 * j + 3] = fmaf(s, code_mantissa<4, 24>(codes), b);
        out[16 + 4 * j + 0] = fmaf(s, code_mantissa<4, 4>(codes), b);
        out[16 + 4 * j + 1] = fmaf(s, code_mantissa<4, 12>(codes), b);
        out[16 + 4 * j + 2] = fmaf(s, code_mantissa<4, 20>(codes), b);
        out[16 + 4 * j + 3] = fmaf(s, code_mantissa<4, 28>(codes), b);
      }
    }
  }

  // Q4_0 codes straight to 16-bit pairs: byte b holds inputs b (low nibble) and b + 16 (high), so
  // one mask of a codes word gives inputs (b, b + 2); w = d (q - 8) in packed 16-bit arithmetic.
  template <class T>
  __device__ void pairs(const Raw& raw, uint32_t (&out)[kUnit / 2]) const {
    if constexpr (!kQ8) {
      uint32_t bytes[kLoadWords * 2];
      block_words(raw, bytes);
      const T d = to_operand<T>(__ushort_as_half(uint16_t(bytes[0])));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t codes = __funnelshift_r(bytes[j], bytes[j + 1], 16);  // bytes [2 + 4j, 6 + 4j)
        out[4 * j + 0] = centered_nibbles<T>(codes, d);        // inputs 4j, 4j + 2
        out[4 * j + 1] = centered_nibbles<T>(codes >> 8, d);   // 4j + 1, 4j + 3
        out[4 * j + 2] = centered_nibbles<T>(codes >> 4, d);   // 4j + 16, 4j + 18
        out[4 * j + 3] = centered_nibbles<T>(codes >> 12, d);  // 4j + 17, 4j + 19
      }
    } else {
      natural_pairs<T>(*this, raw, out);
    }
  }
  __host__ __device__ static constexpr int pair_input(int p, int h) {
    return kQ8 ? 2 * p + h : 4 * (p / 4) + (p % 4) % 2 + (p % 4 >= 2 ? 16 : 0) + 2 * h;
  }
};

// Up to kMaxMultiOutputs matrices of one format over one x, their rows numbered one after another.
template <class M, class TX>
struct Jobs {
  M m[kMaxMultiOutputs];
  TX* y[kMaxMultiOutputs];
  const TX* residual[kMaxMultiOutputs];  // added to y as it is stored; may alias y
  int64_t first_row[kMaxMultiOutputs + 1];
  int count;
};

// Row `row` of input b of job `job` (n rows): the sum, plus the job's residual; for the MLP
// (kParts = 2) silu(gate) * up from the gate and up sums.
template <int kParts, class M, class TX>
__device__ __forceinline__ void store_output(const Jobs<M, TX>& jobs, int job, int64_t n, int b, int64_t row,
                                             const float (&sum)[kParts]) {
  TX* y = jobs.y[job] + b * n + row;
  if constexpr (kParts == 2) {
    *y = from_float<TX>(sum[0] / (1.0f + expf(-sum[0])) * sum[1]);
  } else {
    const TX* residual = jobs.residual[job];
    *y = from_float<TX>(residual != nullptr ? to_float(residual[b * n + row]) + sum[0] : sum[0]);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: the format of each Weight as a type, and the jobs of one launch.

template <class TW>
DenseMatrix<TW> dense_matrix(const Weight& w) {
  return {w.dense.ptr<const TW>(), w.cols()};
}
template <int kBits, class TS>
MlxMatrix<kBits, TS> mlx_matrix(const Weight& w) {
  const QuantizedWeight& q = w.quantized;
  return {q.packed.ptr<const uint4>(), q.scales.ptr<const TS>(), q.biases.ptr<const TS>(), q.cols / MlxMatrix<kBits, TS>::kUnit,
          q.cols >> __builtin_ctz(unsigned(q.spec.group_size)), 0,
          __builtin_ctz(unsigned(q.spec.group_size))};
}
template <bool kQ8>
GgufMatrix<kQ8> gguf_matrix(const Weight& w) {
  const QuantizedWeight& q = w.quantized;
  const auto* packed = q.packed.ptr<const uint8_t>();
  const int64_t bytes = int64_t(q.packed.nbytes());
  return {packed, packed + bytes, bytes / q.rows};
}

// fn(make) where make(weight) builds the format's matrix for weights in `w`'s format: the one
// place where formats and dtypes become types (supports() keeps to what is listed here).
template <class TX, class Fn>
void dispatch_format(const Weight& w, Fn&& fn) {
  if (!w.is_quantized) {
    dispatch_activation(w.dense.dtype, [&](auto tag) { fn([](const Weight& wi) { return dense_matrix<decltype(tag)>(wi); }); });
    return;
  }
  switch (w.quantized.spec.format) {
    case QuantFormat::mlx_affine:
      // Scales and biases share x's dtype (supports() checks), as MLX keeps them in the weights'.
      if (w.quantized.spec.bits == 4) return fn([](const Weight& wi) { return mlx_matrix<4, TX>(wi); });
      return fn([](const Weight& wi) { return mlx_matrix<8, TX>(wi); });
    case QuantFormat::gguf_q4_0: return fn([](const Weight& wi) { return gguf_matrix<false>(wi); });
    case QuantFormat::gguf_q8_0: return fn([](const Weight& wi) { return gguf_matrix<true>(wi); });
  }
}

// The jobs of one launch: y[i] = w[i] x (+ residual), or for the MLP (mlp) y[0] from w[0] and w[1].
template <class M, class TX, class Make>
Jobs<M, TX> make_jobs(Make make, std::span<const Weight> w, std::span<const Tensor> y, const Tensor* residual, bool mlp) {
  Jobs<M, TX> jobs{};
  jobs.count = int(w.size());
  for (int i = 0; i < jobs.count; ++i) {
    jobs.m[i] = make(w[size_t(i)]);
    jobs.y[i] = y[size_t(mlp ? 0 : i)].ptr<TX>();
    jobs.residual[i] = residual != nullptr ? residual->ptr<const TX>() : nullptr;
    jobs.first_row[i + 1] = jobs.first_row[i] + w[size_t(i)].rows();
  }
  return jobs;
}

// The four ops over one kernel family: Family::run<kParts>(x, w, y, residual, stream, op) computes
// y[i] = w[i] x (+ residual) for kParts = 1, y[0] = silu(w[0] x) * (w[1] x) for kParts = 2.
template <class Family>
void run_matvec(const MatvecArgs& a) {
  Family::template run<1>(a.x, {&a.w, 1}, {&a.y, 1}, nullptr, a.stream, "matvec");
}
template <class Family>
void run_matvec_multi(const MatvecMultiArgs& a) {
  Family::template run<1>(a.x, {a.w.data(), size_t(a.count)}, {a.y.data(), size_t(a.count)}, nullptr, a.stream,
                          "matvec_multi");
}
template <class Family>
void run_output_projection(const OutputProjectionArgs& a) {
  Family::template run<1>(a.attn, {&a.wo, 1}, {&a.out, 1}, &a.residual, a.stream, "output_projection");
}
// The activation is stored between the two matvecs in the output dtype, as the op defines it, in
// stream-ordered scratch memory.
template <class Family>
void run_mlp_block(const MlpBlockArgs& a) {
  const cudaStream_t s = stream_of(a.stream);
  const int64_t batch = a.x.dim(0), inter = a.gate.rows();
  void* scratch = nullptr;
  check_launch(scratch_alloc(&scratch, size_t(batch * inter) * dtype_size(a.out.dtype), s), "mlp_block");
  const Tensor act = Tensor::contiguous(scratch, a.out.dtype, {batch, inter}, Device::cuda);
  const Weight gate_up[2] = {a.gate, a.up};
  Family::template run<2>(a.x, gate_up, {&act, 1}, nullptr, a.stream, "mlp_block");
  Family::template run<1>(act, {&a.down, 1}, {&a.out, 1}, nullptr, a.stream, "mlp_block");
  check_launch(scratch_free(scratch, s), "mlp_block");
}

}  // namespace
}  // namespace decodelab::cuda
