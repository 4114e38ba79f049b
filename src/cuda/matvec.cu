// CUDA decode matvecs: y[b] = W x[b] for batch 1..16 with W dense (f32, f16, bf16) or quantized
// (MLX affine 4/8-bit, GGUF Q4_0/Q8_0), and on the same kernel matvec_multi (several W over one x
// in one launch), output_projection (a residual added as y is stored) and mlp_block (gate and up
// rows of one index in one warp, SwiGLU applied as they are stored, then the down matvec).
//
// Decode is bound by reading W, so each byte of it is read once per call: a warp owns a row (one
// per weight for the MLP's gate and up) and its lanes stream the row in "units", the inputs one
// lane handles per step (16 bytes of dense or MLX codes, one 18- or 34-byte GGUF block). The loads
// of several units are issued before any is used, to keep enough bytes in flight. x is small and
// read through L1/L2. Accumulation is f32; one warp reduction per (row, input) at the end.
//
// Quantized codes become floats without an int->float conversion (a quarter-rate instruction on
// Hopper): code q is moved under the mantissa of 1.0f, giving m = 1 + q / 2^bits exactly, and each
// weight is one FMA, w = S * m + B', with S = 2^bits * scale and B' = bias - S (MLX), or for GGUF
// S = 2^bits * d and B' = -(2^bits + 2^(bits-1)) d (w = d (q - 8) for Q4_0; Q8_0's signed codes are
// first flipped to q + 128).
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/cuda.h"

namespace decodelab::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxBatch = 16;

// Code q of `bits` bits at bit `pos` of a word, as the float 1 + q / 2^bits.
template <int kBits, int kPos>
__device__ __forceinline__ float code_mantissa(uint32_t word) {
  constexpr int kTop = 23 - kBits;  // the code's place in the mantissa
  constexpr uint32_t kMask = ((1u << kBits) - 1) << kTop;
  const uint32_t moved = kPos <= kTop ? word << (kTop - kPos) : word >> (kPos - kTop);
  return __uint_as_float((moved & kMask) | 0x3F800000u);
}

// ------------------------------------------------------------------------------------------------
// Weight formats. Each has kUnit (inputs per lane per step), Raw (a unit as loaded), load() (issues
// the unit's global loads), decode() (Raw to kUnit f32 weights in input order) and kUnroll (units
// loaded ahead per lane: about 64 bytes in flight).

template <class TW>
struct DenseMatrix {
  static constexpr int kUnit = kVec<TW>, kUnroll = 4;
  struct Raw {
    uint4 v;
  };
  const TW* w;
  int64_t k;

  __device__ Raw load(int64_t row, int64_t u) const {
    return {__ldcs(reinterpret_cast<const uint4*>(w + row * k) + u)};
  }
  __device__ void decode(const Raw& raw, float (&out)[kUnit]) const {
    const TW* e = reinterpret_cast<const TW*>(&raw.v);
#pragma unroll
    for (int i = 0; i < kUnit; ++i) out[i] = to_float(e[i]);
  }
};

// MLX affine: 16 bytes of codes (32 4-bit or 16 8-bit), all in one group (groups are >= 32 inputs).
template <int kBits, class TS>
struct MlxMatrix {
  static constexpr int kCodes = 32 / kBits;  // per word
  static constexpr int kUnit = 4 * kCodes, kUnroll = 4;
  struct Raw {
    uint4 v;
    TS scale, bias;
  };
  const uint4* packed;  // rows of k * kBits / 128 uint4
  const TS* scales;
  const TS* biases;
  int64_t k;
  int group_shift;  // log2 of the group size

  __device__ Raw load(int64_t row, int64_t u) const {
    const int64_t g = row * (k >> group_shift) + ((u * kUnit) >> group_shift);
    return {__ldcs(packed + row * (k / kUnit) + u), __ldg(scales + g), __ldg(biases + g)};
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
};

// GGUF Q4_0 (18-byte blocks: f16 d, then byte j holds element j low and j + 16 high) and Q8_0
// (34-byte blocks: f16 d, then 32 int8). Blocks are only 2-byte aligned, so a lane reads the 8-byte
// words that cover its block and shifts the bytes into place in registers: 3 or 5 loads per block
// instead of 9 or 17 two-byte ones.
template <bool kQ8>
struct GgufMatrix {
  static constexpr int kUnit = 32;
  static constexpr int kBits = kQ8 ? 8 : 4;
  static constexpr int64_t kBlockBytes = kQ8 ? 34 : 18;
  static constexpr int kLoadWords = int(kBlockBytes + 6 + 7) / 8;  // 8-byte words from the block's aligned start
  static constexpr int kUnroll = kQ8 ? 2 : 4;
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
        raw.w[i] = __ldcs(words + i);
      } else {
        raw.w[i] = 0;  // the last block of the matrix: no reads past its end
        for (int h = 0; h < 4 && word + 2 * h < end; ++h) {
          raw.w[i] |= uint64_t(__ldg(reinterpret_cast<const uint16_t*>(word) + h)) << (16 * h);
        }
      }
    }
    return raw;
  }

  __device__ void decode(const Raw& raw, float (&out)[kUnit]) const {
    // The block's bytes from its start, as 32-bit words: bytes [0, 2) d, then the codes.
    uint32_t bytes[kLoadWords * 2];
#pragma unroll
    for (int i = 0; i < kLoadWords; ++i) {
      const uint64_t next = i + 1 < kLoadWords ? raw.w[i + 1] : 0;
      const uint64_t v = raw.shift == 0 ? raw.w[i] : (raw.w[i] >> raw.shift) | (next << (64 - raw.shift));
      bytes[2 * i] = uint32_t(v);
      bytes[2 * i + 1] = uint32_t(v >> 32);
    }
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
};

// ------------------------------------------------------------------------------------------------
// The kernel.

// n inputs of x from p, widened to f32 (16-byte loads when they fit).
template <class TX, int kN>
__device__ __forceinline__ void load_inputs(const TX* __restrict__ p, float (&out)[kN]) {
  if constexpr (kN % kVec<TX> == 0) {
#pragma unroll
    for (int v = 0; v < kN / kVec<TX>; ++v) load_vec(p + v * kVec<TX>, reinterpret_cast<float(&)[kVec<TX>]>(out[v * kVec<TX>]));
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) out[i] = to_float(p[i]);
  }
}

// Up to kMaxMultiOutputs matrices of one format over one x, their rows numbered one after another.
template <class M, class TX>
struct Jobs {
  M m[kMaxMultiOutputs];
  TX* y[kMaxMultiOutputs];
  const TX* residual[kMaxMultiOutputs];  // added to y as it is stored; may alias y
  int64_t first_row[kMaxMultiOutputs + 1];
  int count;
};

// kParts = 1: a warp computes row `row` of the job that holds it. kParts = 2 (the MLP): a warp
// computes row `row` of jobs 0 (gate) and 1 (up) and stores silu(gate) * up into job 0's y.
template <class M, class TX, int kBatch, int kParts>
__global__ void __launch_bounds__(kWarps * 32) matvec_kernel(Jobs<M, TX> jobs, const TX* __restrict__ x, int64_t k,
                                                             int batch) {
  constexpr int kUnit = M::kUnit, kUnroll = M::kUnroll;
  const int lane = threadIdx.x % 32;
  int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= jobs.first_row[kParts == 2 ? 1 : jobs.count]) return;
  int job = 0;
  while (kParts == 1 && row >= jobs.first_row[job + 1]) ++job;
  row -= jobs.first_row[job];
  const int64_t units = k / kUnit;

  float acc[kParts][kBatch];
#pragma unroll
  for (int p = 0; p < kParts; ++p) {
#pragma unroll
    for (int b = 0; b < kBatch; ++b) acc[p][b] = 0.0f;
  }
  for (int64_t u0 = lane; u0 < units; u0 += 32 * kUnroll) {
    typename M::Raw raw[kParts][kUnroll];
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      if (u0 + 32 * i >= units) break;
#pragma unroll
      for (int p = 0; p < kParts; ++p) raw[p][i] = jobs.m[job + p].load(row, u0 + 32 * i);
    }
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int64_t u = u0 + 32 * i;
      if (u >= units) break;
      float w[kParts][kUnit];
#pragma unroll
      for (int p = 0; p < kParts; ++p) jobs.m[job + p].decode(raw[p][i], w[p]);
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        if (b >= batch) break;
        float xv[kUnit];
        load_inputs<TX, kUnit>(x + b * k + u * kUnit, xv);
#pragma unroll
        for (int p = 0; p < kParts; ++p) {
          float even = 0.0f, odd = 0.0f;  // two chains: half the FMA latency on the critical path
#pragma unroll
          for (int e = 0; e < kUnit; e += 2) {
            even = fmaf(w[p][e], xv[e], even);
            odd = fmaf(w[p][e + 1], xv[e + 1], odd);
          }
          acc[p][b] += even + odd;
        }
      }
    }
  }

  const int64_t n = jobs.first_row[job + 1] - jobs.first_row[job];
#pragma unroll
  for (int b = 0; b < kBatch; ++b) {
    if (b >= batch) break;
    float sum[kParts];
#pragma unroll
    for (int p = 0; p < kParts; ++p) sum[p] = group_sum<32>(acc[p][b]);
    if (lane != 0) continue;
    TX* y = jobs.y[job] + b * n + row;
    if constexpr (kParts == 2) {
      *y = from_float<TX>(sum[0] / (1.0f + expf(-sum[0])) * sum[1]);
    } else {
      const TX* residual = jobs.residual[job];
      *y = from_float<TX>(residual != nullptr ? to_float(residual[b * n + row]) + sum[0] : sum[0]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: the format of each Weight, the launch and the batch's compile-time bound.

template <class TW>
DenseMatrix<TW> dense_matrix(const Weight& w) {
  return {w.dense.ptr<const TW>(), w.cols()};
}
template <int kBits, class TS>
MlxMatrix<kBits, TS> mlx_matrix(const Weight& w) {
  const QuantizedWeight& q = w.quantized;
  return {q.packed.ptr<const uint4>(), q.scales.ptr<const TS>(), q.biases.ptr<const TS>(), q.cols,
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

template <int kBatch, int kParts, class M, class TX>
void launch(const Jobs<M, TX>& jobs, const TX* x, int64_t k, int batch, cudaStream_t s, const char* op) {
  const int64_t rows = jobs.first_row[kParts == 2 ? 1 : jobs.count];
  const unsigned blocks = unsigned((rows + kWarps - 1) / kWarps);
  matvec_kernel<M, TX, kBatch, kParts><<<blocks, kWarps * 32, 0, s>>>(jobs, x, k, batch);
  check_launch(cudaGetLastError(), op);
}

// rows of y[i] = w[i] x (+ residual[i]); kParts = 2: y[0] = silu(w[0] x) * (w[1] x).
template <int kParts, class TX>
void run(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y, const Tensor* residual, Stream stream,
         const char* op) {
  dispatch_format<TX>(w[0], [&](auto make) {
    using M = decltype(make(w[0]));
    Jobs<M, TX> jobs{};
    jobs.count = int(w.size());
    for (int i = 0; i < jobs.count; ++i) {
      jobs.m[i] = make(w[size_t(i)]);
      jobs.y[i] = y[size_t(kParts == 2 ? 0 : i)].ptr<TX>();
      jobs.residual[i] = residual != nullptr ? residual->ptr<const TX>() : nullptr;
      jobs.first_row[i + 1] = jobs.first_row[i] + w[size_t(i)].rows();
    }
    const int batch = int(x.dim(0));
    const int64_t k = x.dim(1);
    const cudaStream_t s = stream_of(stream);
    if (batch == 1) return launch<1, kParts>(jobs, x.ptr<const TX>(), k, batch, s, op);
    if (batch <= 4) return launch<4, kParts>(jobs, x.ptr<const TX>(), k, batch, s, op);
    return launch<kMaxBatch, kParts>(jobs, x.ptr<const TX>(), k, batch, s, op);
  });
}

template <int kParts = 1>
void run_any(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y, const Tensor* residual, Stream stream,
             const char* op) {
  dispatch_activation(x.dtype, [&](auto tag) { run<kParts, decltype(tag)>(x, w, y, residual, stream, op); });
}

}  // namespace

void matvec(const MatvecArgs& a) { run_any(a.x, {&a.w, 1}, {&a.y, 1}, nullptr, a.stream, "matvec"); }

void matvec_multi(const MatvecMultiArgs& a) {
  run_any(a.x, {a.w.data(), size_t(a.count)}, {a.y.data(), size_t(a.count)}, nullptr, a.stream, "matvec_multi");
}

void output_projection(const OutputProjectionArgs& a) {
  run_any(a.attn, {&a.wo, 1}, {&a.out, 1}, &a.residual, a.stream, "output_projection");
}

// The activation is stored between the two matvecs in the output dtype, as the op defines it, in
// stream-ordered scratch memory.
void mlp_block(const MlpBlockArgs& a) {
  const cudaStream_t s = stream_of(a.stream);
  const int64_t batch = a.x.dim(0), inter = a.gate.rows();
  void* scratch = nullptr;
  check_launch(scratch_alloc(&scratch, size_t(batch * inter) * dtype_size(a.out.dtype), s), "mlp_block");
  const Tensor act = Tensor::contiguous(scratch, a.out.dtype, {batch, inter}, Device::cuda);
  const Weight gate_up[2] = {a.gate, a.up};
  run_any<2>(a.x, gate_up, {&act, 1}, nullptr, a.stream, "mlp_block");
  run_any(act, {&a.down, 1}, {&a.out, 1}, nullptr, a.stream, "mlp_block");
  check_launch(scratch_free(scratch, s), "mlp_block");
}

}  // namespace decodelab::cuda
