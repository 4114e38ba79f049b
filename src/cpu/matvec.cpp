// CPU decode matvecs, y[b] = W x[b] for a batch of B inputs with W [N, K] dense (f32, f16, bf16) or
// quantized (MLX affine 4/8-bit, GGUF Q4_0/Q8_0), and matvec_multi, output_projection and mlp_block
// on the same row kernel.
//
// Decode is bound by reading the weights, and the loop order follows from that: rows are handed to
// the pool in ranges of ~256 KB of weights; a pass reads a few rows (4 with one input, 2 with
// more) once from memory and multiplies each chunk of them with all B inputs while it is in
// registers (for each row block, for each input). The inputs are widened to f32 once per call into
// a "panel" (B x K floats, cache resident), permuted into the order in which the format's codes come
// out of a load, so that each decoded vector meets its inputs with one aligned load.
//
// Quantized codes are decoded without an int->float conversion: code q is moved under the mantissa
// of 1.0f (a shift and one ternary-logic op), giving m = 1 + q / 2^bits exactly. With S = 2^bits *
// scale and B' = bias - S every weight is w = S * m + B', so a row's dot product is
//     sum over groups g of   S_g * (sum_k m_k x_k)  +  B'_g * (sum_k x_k),
// one FMA per code per input plus, per chunk, one FMA scaling the partial sums; the second term
// takes per-group input sums from the panel. (m in [1, 2) rather than q keeps S * m and B' of
// similar size: no cancellation in f32.) GGUF blocks are the same with S = 2^bits * d and
// B' = -1.5 S (w = d (q - 8) for Q4_0; Q8_0's signed codes are flipped to q + 128 first).
// Accumulation is f32 and every sum has a fixed order, so results are bit-identical from run to
// run whatever the thread count or split.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/matvec.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"
#include "cpu/simd.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <deque>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/element.h"
#include "cpu/matvec.h"
#include "cpu/thread_pool.h"
#include "hwy/aligned_allocator.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
// Internal linkage: other kernel files define helpers of the same names in this namespace.
namespace {

using DF = hn::ScalableTag<float>;
using DU = hn::RebindToUnsigned<DF>;
using VF = hn::Vec<DF>;
constexpr int64_t kN = int64_t(hn::MaxLanes(DF()));

// A chunk has 16 lanes (one AVX-512 vector of f32); narrower targets take it in 16 / kN parts.
constexpr int64_t kLanes = 16;
// The most inputs one pass over a row pair serves: 2 x 8 accumulators fill half the registers.
constexpr int kMaxInputs = 8;
// How far ahead of the kernel the weights are prefetched (measured: 1-4 KB all help, 2 KB best).
constexpr int64_t kPrefetchBytes = 2048;

int64_t DivCeil(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t RoundUp(int64_t a, int64_t b) { return DivCeil(a, b) * b; }

// The kernel's lambdas must inline like HWY_INLINE functions: a call would pass vectors through
// memory.
#ifndef MATVEC_INLINE
#define MATVEC_INLINE __attribute__((always_inline))
#endif

// fn(std::integral_constant<int, i>) for i in [0, kCount): compile-time indices keep arrays of
// vectors in registers.
template <int... kI, class Fn>
HWY_INLINE void UnrollImpl(std::integer_sequence<int, kI...>, Fn&& fn) {
  (fn(std::integral_constant<int, kI>()), ...);
}
template <int kCount, class Fn>
HWY_INLINE void Unroll(Fn&& fn) {
  UnrollImpl(std::make_integer_sequence<int, kCount>(), fn);
}

// ------------------------------------------------------------------------------------------------
// Formats. Each describes a chunk of a weight row: kLanes lanes of 32-bit code words holding kCodes
// codes of kBits bits each (code i at bits [i * kBits, (i + 1) * kBits)). Element(l, i) is the
// input, within the chunk, that code i of lane l multiplies. Lanes come from the chunk's bytes in
// segments of kSegLanes consecutive words kSegStride bytes apart (GGUF: a block of kSegStride bytes,
// its f16 scale d and then the codes). Formats of one panel kind share the panel: per chunk and
// input kPanelChunk floats, the inputs in code order and for GGUF then the sum of each lane's inputs
// (the term of the blocks' offsets, whose scales are read with the chunk).
template <int kBitsT, int64_t kChunkBytesT, int64_t kSegLanesT, int64_t kSegStrideT, bool kGgufT, uint32_t kFlipT = 0>
struct QuantLayout {
  static constexpr int kBits = kBitsT, kCodes = 32 / kBits;
  static constexpr bool kGguf = kGgufT;
  static constexpr int64_t kChunk = kLanes * kCodes, kChunkBytes = kChunkBytesT;
  static constexpr int64_t kSegLanes = kSegLanesT, kSegStride = kSegStrideT, kSegOffset = kGguf ? 2 : 0;
  static constexpr int64_t kPanelChunk = kChunk + (kGguf ? kLanes : 0);
  static constexpr uint32_t kFlip = kFlipT;
};

// MLX: 16 u32 words of 8 or 4 codes; 32 to 128 inputs share a scale (2 to 16 lanes).
struct Mlx4 : QuantLayout<4, 64, 16, 64, false> {
  static constexpr int kPanel = 1;
  static constexpr int64_t Element(int64_t l, int64_t i) { return 8 * l + i; }
};
struct Mlx8 : QuantLayout<8, 64, 16, 64, false> {
  static constexpr int kPanel = 2;
  static constexpr int64_t Element(int64_t l, int64_t i) { return 4 * l + i; }
};

// Q4_0: 4 blocks of 18 bytes. Lane l is word l % 4 of block l / 4, whose byte j holds element j (low
// nibble) and j + 16 (high nibble) of the block.
struct Q4_0 : QuantLayout<4, 72, 4, 18, true> {
  static constexpr int kPanel = 3;
  static constexpr int64_t Element(int64_t l, int64_t i) { return 32 * (l / 4) + 4 * (l % 4) + i / 2 + 16 * (i % 2); }
};

// Q8_0: 2 blocks of 34 bytes, int8 codes flipped to unsigned (q + 128) by the XOR.
struct Q8_0 : QuantLayout<8, 68, 8, 34, true, 0x80808080u> {
  static constexpr int kPanel = 4;
  static constexpr int64_t Element(int64_t l, int64_t i) { return 4 * l + i; }
};

// Dense rows: lanes are elements, kCodes vectors per chunk, in natural order.
template <class T>
struct Dense {
  using Elem = T;
  static constexpr int kBits = 0, kCodes = 4, kPanel = 0;
  static constexpr bool kGguf = false;
  static constexpr int64_t kChunk = 64, kChunkBytes = 64 * int64_t(sizeof(T)), kPanelChunk = kChunk;
  static constexpr int64_t Element(int64_t l, int64_t i) { return kLanes * i + l; }
};

enum class Codes : uint8_t { f32, f16, bf16, mlx4, mlx8, q4_0, q8_0 };

template <class Fn>
decltype(auto) DispatchCodes(Codes codes, Fn&& fn) {
  switch (codes) {
    case Codes::f16: return fn(Dense<hwy::float16_t>());
    case Codes::bf16: return fn(Dense<hwy::bfloat16_t>());
    case Codes::mlx4: return fn(Mlx4());
    case Codes::mlx8: return fn(Mlx8());
    case Codes::q4_0: return fn(Q4_0());
    case Codes::q8_0: return fn(Q8_0());
    case Codes::f32: break;
  }
  return fn(Dense<float>());
}

// A weight matrix as the row kernel reads it.
struct WeightRef {
  Codes codes = Codes::f32;
  const uint8_t* data = nullptr;
  int64_t rows = 0, cols = 0, row_bytes = 0;
  int64_t group = 0;  // inputs per scale; 0 for dense weights
  const void* scales = nullptr;  // MLX: [rows, cols / group] of scale_dtype
  const void* biases = nullptr;
  DType scale_dtype = DType::f16;
};

WeightRef RefOf(const Weight& w) {
  WeightRef r;
  r.rows = w.rows();
  r.cols = w.cols();
  if (!w.is_quantized) {
    r.codes = w.dense.dtype == DType::f16 ? Codes::f16 : w.dense.dtype == DType::bf16 ? Codes::bf16 : Codes::f32;
    r.data = w.dense.ptr<const uint8_t>();
    r.row_bytes = r.cols * int64_t(dtype_size(w.dense.dtype));
    return r;
  }
  const QuantizedWeight& q = w.quantized;
  r.data = q.packed.ptr<const uint8_t>();
  r.row_bytes = int64_t(q.packed.nbytes()) / q.rows;
  r.group = q.spec.group_size;
  switch (q.spec.format) {
    case QuantFormat::mlx_affine:
      r.codes = q.spec.bits == 4 ? Codes::mlx4 : Codes::mlx8;
      r.scales = q.scales.data;
      r.biases = q.biases.data;
      r.scale_dtype = q.scales.dtype;
      break;
    case QuantFormat::gguf_q4_0: r.codes = Codes::q4_0; break;
    case QuantFormat::gguf_q8_0: r.codes = Codes::q8_0; break;
  }
  return r;
}

// ------------------------------------------------------------------------------------------------
// The panel: one call's inputs as the row kernel reads them, for one input order and group size.
// x is f32 [chunks][batch][kPanelChunk]: the inputs of one chunk for the whole batch side by side
// (so that a kernel addresses all of them at constant offsets from one pointer), each permuted into
// the order of the codes (code i of lane l at i * kLanes + l) and zero-padded past cols; for GGUF
// followed by the lane sums. MLX: sums [batch][sums_stride] are the per-group input sums in input
// order, zero-padded to a multiple of kLanes.
struct Panel {
  int kind = 0;
  int64_t group = 0, batch = 0, chunk_stride = 0, sums_stride = 0;
  hwy::AlignedFreeUniquePtr<float[]> x, sums;
};

// x = [batch, cols] of an activation dtype, widened a chunk at a time.
template <class F, class T>
Panel BuildPanel(const T* x, int64_t batch, int64_t cols, int64_t group) {
  const DF df;
  Panel p;
  p.kind = F::kPanel;
  p.group = group;
  p.batch = batch;
  p.chunk_stride = batch * F::kPanelChunk;
  const int64_t chunks = DivCeil(cols, F::kChunk);
  p.x = hwy::AllocateAligned<float>(size_t(chunks * p.chunk_stride));
  if (group > 0) {
    p.sums_stride = RoundUp(cols / group, kLanes);
    p.sums = hwy::AllocateAligned<float>(size_t(batch * p.sums_stride));
    std::fill(p.sums.get(), p.sums.get() + batch * p.sums_stride, 0.0f);
  }
  alignas(64) float in[F::kChunk];
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t first = c * F::kChunk, count = std::min(F::kChunk, cols - first);
    for (int64_t b = 0; b < batch; ++b) {
      const T* xb = x + b * cols + first;
      int64_t k = 0;
      for (; k + kN <= count; k += kN) hn::Store(LoadF32(df, xb + k), df, in + k);
      for (; k < count; ++k) in[k] = to_f32(xb[k]);
      std::fill(in + count, in + F::kChunk, 0.0f);
      float* out = p.x.get() + c * p.chunk_stride + b * F::kPanelChunk;
      for (int64_t i = 0; i < F::kCodes; ++i) {
        for (int64_t l = 0; l < kLanes; ++l) out[i * kLanes + l] = in[F::Element(l, i)];
      }
      if constexpr (F::kGguf) {
        for (int64_t l = 0; l < kLanes; ++l) {
          float sum = 0.0f;
          for (int64_t i = 0; i < F::kCodes; ++i) sum += out[i * kLanes + l];
          out[F::kChunk + l] = sum;
        }
      }
      if (group > 0) {
        // Chunks hold whole groups or whole chunks make a group (both are powers of two >= 32).
        const int64_t piece = std::min(group, F::kChunk);
        for (k = 0; k < count; k += piece) {
          VF sum = hn::Zero(df);
          for (int64_t j = k; j < k + piece; j += kN) sum = hn::Add(sum, hn::Load(df, in + j));
          p.sums[size_t(b * p.sums_stride + (first + k) / group)] += hn::GetLane(hn::SumOfLanes(df, sum));
        }
      }
    }
  }
  return p;
}

// The panels of one call: one per input order and group size among the weights, built on first use.
template <class T>
class Panels {
 public:
  Panels(const T* x, int64_t batch, int64_t cols) : x_(x), batch_(batch), cols_(cols) {}

  const Panel& For(const WeightRef& w) {
    return DispatchCodes(w.codes, [&](auto format) -> const Panel& {
      using F = decltype(format);
      const int64_t group = F::kGguf ? 0 : w.group;  // group sums are for MLX's biases
      for (const Panel& p : panels_) {
        if (p.kind == F::kPanel && p.group == group) return p;
      }
      panels_.push_back(BuildPanel<F>(x_, batch_, cols_, group));
      return panels_.back();
    });
  }

 private:
  const T* x_;
  int64_t batch_, cols_;
  std::deque<Panel> panels_;  // callers keep references: a deque does not move its elements
};

// ------------------------------------------------------------------------------------------------
// Per-row MLX scales: S and B' for each group of one row (see the top of the file), zero-padded so
// that the per-lane lookups of a last, partial chunk stay in bounds and add nothing. (GGUF scales
// are read with each chunk.)
struct RowScales {
  template <class F>
  RowScales(const WeightRef& w, F /*format*/) {
    if constexpr (F::kBits != 0 && !F::kGguf) {
      groups = w.cols / w.group;
      shift = std::countr_zero(uint64_t(w.group));
      const int64_t padded = RoundUp(groups, kLanes) + 2 * kLanes;
      scale = hwy::AllocateAligned<float>(size_t(padded));
      offset = hwy::AllocateAligned<float>(size_t(padded));
      std::fill(scale.get(), scale.get() + padded, 0.0f);
      std::fill(offset.get(), offset.get() + padded, 0.0f);
      // Lane l's group relative to the first lane of its vector (all lanes of a lane hold one group).
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t first = l / kN * kN;
        lane_group[l] = int32_t((F::Element(l, 0) >> shift) - (F::Element(first, 0) >> shift));
      }
    }
  }

  int64_t groups = 0;
  int shift = 0;  // log2 of the group size
  hwy::AlignedFreeUniquePtr<float[]> scale, offset;
  alignas(64) int32_t lane_group[kLanes] = {};
};

template <class TS>
void LoadMlxScales(const TS* s, const TS* b, float range, RowScales& rs) {
  const DF df;
  const auto r = hn::Set(df, range);
  int64_t g = 0;
  for (; g + kN <= rs.groups; g += kN) {
    const auto scale = hn::Mul(LoadF32(df, s + g), r);
    hn::Store(scale, df, rs.scale.get() + g);
    hn::Store(hn::Sub(LoadF32(df, b + g), scale), df, rs.offset.get() + g);
  }
  for (; g < rs.groups; ++g) {
    rs.scale[size_t(g)] = to_f32(s[g]) * range;
    rs.offset[size_t(g)] = to_f32(b[g]) - rs.scale[size_t(g)];
  }
}

template <class F>
void LoadRowScales(const WeightRef& w, int64_t n, RowScales& rs) {
  constexpr float kRange = float(1 << F::kBits);
  if constexpr (F::kBits != 0 && !F::kGguf) {
    dispatch_activation(w.scale_dtype, [&](auto tag) {
      using TS = decltype(tag);
      const TS* scales = static_cast<const TS*>(w.scales) + n * rs.groups;
      const TS* biases = static_cast<const TS*>(w.biases) + n * rs.groups;
      // The next row's scales and biases: two short streams that the prefetcher would fetch late.
      for (int64_t at = 0; at < rs.groups; at += 64 / int64_t(sizeof(TS))) {
        __builtin_prefetch(scales + rs.groups + at);
        __builtin_prefetch(biases + rs.groups + at);
      }
      LoadMlxScales(scales, biases, kRange, rs);
    });
  }
}

// ------------------------------------------------------------------------------------------------
// The row kernel.

// Lanes(d) u32 words from unaligned bytes.
template <class D>
HWY_INLINE hn::Vec<D> LoadU32(D d, const uint8_t* p) {
  if constexpr (hn::MaxLanes(D()) == 1) {
    uint32_t word;
    std::memcpy(&word, p, 4);
    return hn::Set(d, word);
  } else {
    return hn::BitCast(d, hn::LoadU(hn::Repartition<uint8_t, D>(), p));
  }
}

// Lanes [l0, l0 + Lanes(d)) of a chunk's code words; segments are joined in registers.
template <class F, class D>
HWY_INLINE hn::Vec<D> LoadWords(D d, const uint8_t* chunk, int64_t l0) {
  constexpr int64_t kCount = int64_t(hn::MaxLanes(D()));
  if constexpr (kCount <= F::kSegLanes) {
    return LoadU32(d, chunk + (l0 / F::kSegLanes) * F::kSegStride + F::kSegOffset + 4 * (l0 % F::kSegLanes));
  } else {
#if HWY_TARGET != HWY_SCALAR  // (one lane never gets here, and has no Combine)
    const hn::Half<D> dh;
    return hn::Combine(d, LoadWords<F>(dh, chunk, l0 + kCount / 2), LoadWords<F>(dh, chunk, l0));
#endif
  }
}

// Code kI of every word as the float 1 + q / 2^kBits: the code moved to the top mantissa bits
// [23 - kBits, 23) under the exponent of 1.0f.
template <int kBits, int kI>
HWY_INLINE VF CodesAsMantissa(hn::Vec<DU> words) {
  const DU du;
  constexpr int kTop = 23 - kBits;
  constexpr int kShift = kTop - kI * kBits;
  hn::Vec<DU> moved = words;
  if constexpr (kShift > 0) moved = hn::ShiftLeft<kShift>(words);
  if constexpr (kShift < 0) moved = hn::ShiftRight<-kShift>(words);
  const auto mask = hn::Set(du, ((1u << kBits) - 1) << kTop);
  return hn::BitCast(DF(), hn::OrAnd(hn::Set(du, 0x3F800000u), moved, mask));
}

// Two ways to apply the scales, both one FMA per code per input:
// - one input ("partial sums"): the codes' partial sums are scaled once per chunk, which needs no
//   per-code dequantization; the biases' term is added once per row (MLX) or per chunk (GGUF).
// - several ("dequantized"): each vector of codes becomes weights, w = S * m + B', with one FMA
//   shared by all inputs, and each input is then a plain FMA.
// Either way several rows go at once (4 with one input, 2 with more: the registers) so that each
// load of an input serves several FMAs: the inputs of a long row live in L2, and one load per FMA
// from L2 measured ~30% slower than the same stream with the inputs in L1. Each row is still its
// own sequential stream. Dense weights take the same two paths without scales.

// Where each lane's GGUF scale d lies among the kN words read from the head of the first block of
// the lane's vector: the f16 at the head of block j (relative) is word (j * kSegStride) / 4, low or
// high half.
template <class F>
struct GgufScaleLanes {
  constexpr GgufScaleLanes() {
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t block = l / F::kSegLanes - (l / kN * kN) / F::kSegLanes, at = block * F::kSegStride;
      word[l] = int32_t(at / 4);
      shift[l] = uint32_t(at % 4 * 8);
    }
  }
  alignas(64) int32_t word[kLanes] = {};
  alignas(64) uint32_t shift[kLanes] = {};
};
template <class F>
constexpr GgufScaleLanes<F> kGgufScaleLanes{};

// The S = 2^kBits * d of each lane's block, lanes [l0, l0 + kN) of a GGUF chunk. f16 to f32 exactly
// in integer lanes: the magnitude bits under an f32 exponent 112 too small, then one multiply by
// 2^(112 + kBits) renormalizes (subnormal halves too) and applies the 2^kBits; the sign moves over.
template <class F>
HWY_INLINE VF GgufScales(const uint8_t* chunk, int64_t l0) {
  const DF df;
  const DU du;
  constexpr const GgufScaleLanes<F>& kAt = kGgufScaleLanes<F>;
  const auto words = LoadU32(du, chunk + l0 / F::kSegLanes * F::kSegStride);
  const auto half = hn::TableLookupLanes(words, hn::SetTableIndices(du, kAt.word + l0)) >> hn::Load(du, kAt.shift + l0);
  const auto magnitude = hn::BitCast(df, hn::And(hn::ShiftLeft<13>(half), hn::Set(du, 0x0FFFE000u)));
  const auto sign = hn::And(hn::ShiftLeft<16>(half), hn::Set(du, 0x80000000u));
  const float kRenormalize = float(uint64_t{1} << 56) * float(uint64_t{1} << 56) * float(1 << F::kBits);
  return hn::Or(hn::Mul(magnitude, hn::Set(df, kRenormalize)), hn::BitCast(df, sign));
}

// acc[r][b] += chunk of row r . chunk of x[b], as lane sums. x points at the chunk's inputs.
template <class F, int kR, int kB, bool kPartials>
HWY_INLINE void DotChunk(const uint8_t* const (&chunk)[kR], int64_t c, const RowScales* const (&rs)[kR],
                         const float* x, VF (&acc)[kR][kB]) {
  static_assert(!kPartials || kB == 1, "partial sums are for one input");
  const DF df;
  const DU du;
  for (int64_t l0 = 0; l0 < kLanes; l0 += kN) {
    hn::Vec<DU> words[kR];
    VF scale[kR], offset[kR];
    Unroll<kR>([&](auto r) MATVEC_INLINE {
      if constexpr (F::kGguf) {
        words[r] = LoadWords<F>(du, chunk[r], l0);
        if constexpr (F::kFlip != 0) words[r] = hn::Xor(words[r], hn::Set(du, F::kFlip));
        scale[r] = GgufScales<F>(chunk[r], l0);
        if constexpr (!kPartials) offset[r] = hn::Mul(scale[r], hn::Set(df, -1.5f));
      } else if constexpr (F::kBits != 0) {
        words[r] = LoadWords<F>(du, chunk[r], l0);
        // The S and B' of each lane's group: a few groups' values spread over their lanes.
        const int64_t g = (c * F::kChunk + F::Element(l0, 0)) >> rs[r]->shift;
        const auto lanes = hn::SetTableIndices(df, rs[r]->lane_group + l0);
        scale[r] = hn::TableLookupLanes(hn::LoadU(df, rs[r]->scale.get() + g), lanes);
        if constexpr (!kPartials) offset[r] = hn::TableLookupLanes(hn::LoadU(df, rs[r]->offset.get() + g), lanes);
      }
    });
    // Code vector i of row r: raw codes m (partial sums) or weights (dense, or dequantized).
    const auto codes = [&](auto r, auto i_tag) MATVEC_INLINE {
      constexpr int kI = decltype(i_tag)::value;
      if constexpr (F::kBits == 0) {
        return LoadF32(df, reinterpret_cast<const typename F::Elem*>(chunk[r]) + kI * kLanes + l0);
      } else if constexpr (kPartials) {
        return CodesAsMantissa<F::kBits, kI>(words[r]);
      } else {
        return hn::MulAdd(CodesAsMantissa<F::kBits, kI>(words[r]), scale[r], offset[r]);
      }
    };
    const auto input = [&](auto b, auto i_tag) MATVEC_INLINE {
      return hn::Load(df, x + b * F::kPanelChunk + decltype(i_tag)::value * kLanes + l0);
    };
    if constexpr (kPartials) {
      // Two chains of partial sums per row (even and odd codes) hide the FMA latency.
      VF part[kR][2];
      Unroll<F::kCodes>([&](auto i_tag) MATVEC_INLINE {
        constexpr int kI = decltype(i_tag)::value;
        const VF xv = input(0, i_tag);
        Unroll<kR>([&](auto r) MATVEC_INLINE {
          if constexpr (kI < 2) {
            part[r][kI % 2] = hn::Mul(codes(r, i_tag), xv);
          } else {
            part[r][kI % 2] = hn::MulAdd(codes(r, i_tag), xv, part[r][kI % 2]);
          }
        });
      });
      Unroll<kR>([&](auto r) MATVEC_INLINE {
        VF sum = hn::Add(part[r][0], part[r][1]);
        if constexpr (F::kBits == 0) {
          acc[r][0] = hn::Add(acc[r][0], sum);
        } else {
          // GGUF: B' = -1.5 S, times the lane's input sum from the panel.
          if constexpr (F::kGguf) sum = hn::MulAdd(hn::Load(df, x + F::kChunk + l0), hn::Set(df, -1.5f), sum);
          acc[r][0] = hn::MulAdd(sum, scale[r], acc[r][0]);
        }
      });
    } else {
      Unroll<F::kCodes>([&](auto i_tag) MATVEC_INLINE {
        VF w[kR];
        Unroll<kR>([&](auto r) MATVEC_INLINE { w[r] = codes(r, i_tag); });
        Unroll<kB>([&](auto b) MATVEC_INLINE {
          const VF xv = input(b, i_tag);
          Unroll<kR>([&](auto r) MATVEC_INLINE { acc[r][b] = hn::MulAdd(w[r], xv, acc[r][b]); });
        });
      });
    }
  }
}

// One pass of DotChunks: rows [0, kR) from `row` on (row_bytes apart, MLX scales in scales[r]),
// chunks [c0, c1) of `cols` inputs, inputs x (at chunk c0 = 0), accumulators acc[r][b] (vectors in
// memory, rows acc_row_stride floats apart).
struct Pass {
  const uint8_t* row;
  int64_t row_bytes, cols, c0, c1;
  const RowScales* scales;
  const float* x;
  int64_t chunk_stride;
  float* acc;
  int64_t acc_row_stride;
};

// acc[r][b] += row r . x[b] over the pass's chunks; the last chunk of a row may be partial.
template <class F, int kR, int kB, bool kPartials>
HWY_NOINLINE void DotChunks(const Pass& p) {
  const DF df;
  VF acc[kR][kB];
  const RowScales* rs[kR];
  Unroll<kR>([&](auto r) MATVEC_INLINE {
    rs[r] = p.scales + r;
    Unroll<kB>([&](auto b) MATVEC_INLINE { acc[r][b] = hn::Load(df, p.acc + r * p.acc_row_stride + b * kN); });
  });
  const int64_t full = p.cols / F::kChunk;
  for (int64_t c = p.c0; c < std::min(p.c1, full); ++c) {
    const uint8_t* chunk[kR];
    // The hardware prefetcher alone falls short: ask for each line ~2 KB ahead into L2. Past the
    // end of a row, "ahead" is the same row of the next pass, kR rows on (or harmless past the end).
    int64_t ahead = c * F::kChunkBytes + kPrefetchBytes;
    if (ahead >= p.row_bytes) ahead += (kR - 1) * p.row_bytes;
    Unroll<kR>([&](auto r) MATVEC_INLINE {
      chunk[r] = p.row + r * p.row_bytes + c * F::kChunkBytes;
      for (int64_t at = 0; at < F::kChunkBytes; at += 64) __builtin_prefetch(p.row + r * p.row_bytes + ahead + at, 0, 2);
    });
    DotChunk<F, kR, kB, kPartials>(chunk, c, rs, p.x + c * p.chunk_stride, acc);
  }
  if (p.c1 > full) {
    // The partial last chunk, from zero-padded copies: padding codes meet zero inputs.
    alignas(64) uint8_t tail[kR][F::kChunkBytes] = {};
    const uint8_t* chunk[kR];
    Unroll<kR>([&](auto r) MATVEC_INLINE {
      const int64_t bytes = p.cols % F::kChunk * F::kChunkBytes / F::kChunk;
      std::memcpy(tail[r], p.row + r * p.row_bytes + full * F::kChunkBytes, size_t(bytes));
      chunk[r] = tail[r];
    });
    DotChunk<F, kR, kB, kPartials>(chunk, full, rs, p.x + full * p.chunk_stride, acc);
  }
  Unroll<kR>([&](auto r) MATVEC_INLINE {
    Unroll<kB>([&](auto b) MATVEC_INLINE { hn::Store(acc[r][b], df, p.acc + r * p.acc_row_stride + b * kN); });
  });
}

// DotChunks by dequantized weights for 1, 2, 4 or 8 inputs (a pass takes the most that fit; other
// counts take several passes, the later ones reading the rows from cache). Every input count is one
// more instantiation of the row kernel per format, rows and SIMD target: powers of two keep the
// compile time and the build's memory in bounds.
template <class F, int kR>
void DotChunksFor(int inputs, const Pass& p) {
  static_assert(kMaxInputs == 8, "the cases below");
  switch (inputs) {
    case 8: return DotChunks<F, kR, 8, false>(p);
    case 4: return DotChunks<F, kR, 4, false>(p);
    case 2: return DotChunks<F, kR, 2, false>(p);
    default: return DotChunks<F, kR, 1, false>(p);
  }
}

// How rows are walked: the most inputs per pass (1: one input at a time, by partial sums), the most
// rows per pass, and tiles of rows x K slices (whole rows when slice_cols is 0).
struct Plan {
  int max_inputs = kMaxInputs;
  int max_rows = 4;
  int64_t tile_rows = 4;
  int64_t slice_cols = 0;
};

// out[b * (n1 - n0) + n - n0] = row n of w . x[b] for rows [n0, n1).
template <class F>
void DotRowsT(const WeightRef& w, const Panel& p, int64_t n0, int64_t n1, const Plan& plan, float* out) {
  const DF df;
  const int64_t batch = p.batch, count = n1 - n0, chunks = DivCeil(w.cols, F::kChunk);
  // One input at a time takes the partial-sums path, up to 4 rows at once; more inputs, 2 rows.
  const bool partials = batch == 1 || plan.max_inputs == 1;
  const int max_rows = std::min(plan.max_rows, partials ? 4 : 2);
  const int64_t tile = std::min(plan.tile_rows, count);
  const int64_t slice = plan.slice_cols > 0 ? std::max<int64_t>(1, plan.slice_cols / F::kChunk) : chunks;
  std::vector<RowScales> scales;
  for (int64_t r = 0; r < tile; ++r) scales.emplace_back(w, F());
  // One vector of lane sums per (row of the tile, input).
  const int64_t acc_row_stride = batch * kN;
  auto acc = hwy::AllocateAligned<float>(size_t(tile * acc_row_stride));
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t rows = std::min(tile, n1 - t0);
    for (int64_t r = 0; r < rows; ++r) {
      LoadRowScales<F>(w, t0 + r, scales[size_t(r)]);
      // Partial sums start from the biases' term, sum_g B'_g * (sum of group g's inputs).
      for (int64_t b = 0; b < batch; ++b) {
        VF v = hn::Zero(df);
        if (F::kBits != 0 && !F::kGguf && partials) {
          const float* sums = p.sums.get() + b * p.sums_stride;
          for (int64_t g = 0; g < p.sums_stride; g += kN) {
            v = hn::MulAdd(hn::Load(df, scales[size_t(r)].offset.get() + g), hn::Load(df, sums + g), v);
          }
        }
        hn::Store(v, df, acc.get() + r * acc_row_stride + b * kN);
      }
    }
    for (int64_t c0 = 0; c0 < chunks; c0 += slice) {
      const int64_t c1 = std::min(chunks, c0 + slice);
      for (int64_t r = 0; r < rows;) {
        const int64_t left = rows - r;
        const int pass_rows = left >= 4 && max_rows >= 4 ? 4 : left >= 2 && max_rows >= 2 ? 2 : 1;
        const uint8_t* row = w.data + (t0 + r) * w.row_bytes;
        for (int64_t b0 = 0, inputs = 0; b0 < batch; b0 += inputs) {
          inputs = int64_t{1} << (63 - std::countl_zero(uint64_t(std::min<int64_t>(plan.max_inputs, batch - b0))));
          const Pass pass{row, w.row_bytes, w.cols, c0, c1, &scales[size_t(r)], p.x.get() + b0 * F::kPanelChunk,
                          p.chunk_stride, acc.get() + r * acc_row_stride + b0 * kN, acc_row_stride};
          if (partials) {
            if (pass_rows == 4) DotChunks<F, 4, 1, true>(pass);
            if (pass_rows == 2) DotChunks<F, 2, 1, true>(pass);
            if (pass_rows == 1) DotChunks<F, 1, 1, true>(pass);
          } else {
            if (pass_rows == 2) DotChunksFor<F, 2>(int(inputs), pass);
            if (pass_rows == 1) DotChunksFor<F, 1>(int(inputs), pass);
          }
        }
        r += pass_rows;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t b = 0; b < batch; ++b) {
        out[b * count + t0 - n0 + r] = hn::GetLane(hn::SumOfLanes(df, hn::Load(df, acc.get() + r * acc_row_stride + b * kN)));
      }
    }
  }
}

void DotRows(const WeightRef& w, const Panel& p, int64_t n0, int64_t n1, const Plan& plan, float* out) {
  DispatchCodes(w.codes, [&](auto format) { DotRowsT<decltype(format)>(w, p, n0, n1, plan, out); });
}

// ------------------------------------------------------------------------------------------------
// Spreading rows over the pool.

// Rows [begin, end) of weight `weight`.
struct RowRange {
  int weight;
  int64_t begin, end;
};

// Ranges of ~256 KB of weights: many more than threads, so that the pool's one-at-a-time hand-out
// balances them (other work may hold a core), and large enough that handing one out is noise.
std::vector<RowRange> SplitRows(std::span<const WeightRef> weights) {
  constexpr int64_t kRangeBytes = 256 << 10;
  std::vector<RowRange> ranges;
  for (size_t i = 0; i < weights.size(); ++i) {
    const WeightRef& w = weights[i];
    const int64_t step = std::max<int64_t>(1, kRangeBytes / std::max<int64_t>(1, w.row_bytes));
    for (int64_t n = 0; n < w.rows; n += step) ranges.push_back({int(i), n, std::min(w.rows, n + step)});
  }
  return ranges;
}

// dst[i] = v[i] (+ residual[i]) in T, for one output row's range.
template <class T>
void StoreOutputs(const float* v, const T* residual, T* dst, int64_t count) {
  const DF df;
  int64_t i = 0;
  for (; i + kN <= count; i += kN) {
    VF out = hn::LoadU(df, v + i);
    if (residual != nullptr) out = hn::Add(out, LoadF32(df, residual + i));
    StoreF32(df, out, dst + i);
  }
  for (; i < count; ++i) dst[i] = from_f32<T>(residual != nullptr ? to_f32(residual[i]) + v[i] : v[i]);
}

// y[i] = W[i] x (+ residual[i]) for each weight, x = [batch, cols] of T, the rows of all weights
// spread over the pool as one row space. Every row is computed the same way whatever range it falls
// in, so the split does not change results.
template <class T>
void RunMatvecsT(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y, const Tensor* residual,
                 const Plan& plan, bool static_split) {
  const int64_t batch = x.dim(0), cols = x.dim(1);
  Panels<T> panels(x.ptr<const T>(), batch, cols);
  std::vector<WeightRef> refs;
  std::vector<const Panel*> panel_of;
  for (const Weight& wi : w) refs.push_back(RefOf(wi));
  for (const WeightRef& r : refs) panel_of.push_back(&panels.For(r));
  std::vector<RowRange> ranges = SplitRows(refs);
  if (static_split) {
    // One contiguous range per thread, as plain row-parallel code splits.
    const int64_t rows = refs[0].rows, parts = std::min<int64_t>(rows, ThreadPool::instance().size());
    ranges.clear();
    for (int64_t i = 0; i < parts; ++i) ranges.push_back({0, rows * i / parts, rows * (i + 1) / parts});
  }
  ThreadPool::instance().parallel_for(int64_t(ranges.size()), [&](int64_t t) {
    const RowRange& r = ranges[size_t(t)];
    const int64_t rows = y[size_t(r.weight)].dim(1), count = r.end - r.begin;
    std::vector<float> v(size_t(batch * count));
    DotRows(refs[size_t(r.weight)], *panel_of[size_t(r.weight)], r.begin, r.end, plan, v.data());
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t at = b * rows + r.begin;
      StoreOutputs(v.data() + b * count, residual != nullptr ? residual->ptr<const T>() + at : nullptr,
                   y[size_t(r.weight)].ptr<T>() + at, count);
    }
  });
}

void RunMatvecs(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y, const Tensor* residual,
                const Plan& plan, bool static_split = false) {
  dispatch_activation(x.dtype, [&](auto tag) { RunMatvecsT<decltype(tag)>(x, w, y, residual, plan, static_split); });
}

// The stable plan: whole rows, in pairs when there are several inputs. (Slicing K as cpu.tiled
// does keeps the inputs in L1 but makes the weight stream jump between rows, and measured slower.)
Plan StablePlan() { return Plan{}; }

// Plain row-parallel: one (row, input) at a time.
Plan RowParallelPlan() { return Plan{1, 1, 1, 0}; }

// Tiles of 16 rows x K slices whose inputs for the whole batch fit in 16 KB of L1.
Plan TiledPlan(int64_t batch) { return Plan{kMaxInputs, 4, 16, std::max<int64_t>(128, (4096 / batch) / 128 * 128)}; }

// ------------------------------------------------------------------------------------------------
// The exported kernels.

void Matvec(const MatvecArgs& a) { RunMatvecs(a.x, {&a.w, 1}, {&a.y, 1}, nullptr, StablePlan()); }
void MatvecRowpar(const MatvecArgs& a) { RunMatvecs(a.x, {&a.w, 1}, {&a.y, 1}, nullptr, RowParallelPlan(), true); }
void MatvecTiled(const MatvecArgs& a) { RunMatvecs(a.x, {&a.w, 1}, {&a.y, 1}, nullptr, TiledPlan(a.x.dim(0))); }

void MatvecMulti(const MatvecMultiArgs& a) {
  RunMatvecs(a.x, {a.w.data(), size_t(a.count)}, {a.y.data(), size_t(a.count)}, nullptr, StablePlan());
}
void MatvecMultiTiled(const MatvecMultiArgs& a) {
  RunMatvecs(a.x, {a.w.data(), size_t(a.count)}, {a.y.data(), size_t(a.count)}, nullptr, TiledPlan(a.x.dim(0)));
}

// out may alias residual: each element is read and then written by the same thread.
void OutputProjection(const OutputProjectionArgs& a) {
  RunMatvecs(a.attn, {&a.wo, 1}, {&a.out, 1}, &a.residual, StablePlan());
}

// out = down (silu(gate x) * (up x)). Gate and up rows of a range are read together and the SwiGLU
// is applied as they come out; the activation is stored in the output dtype (as the op defines it)
// and becomes the down matvec's input.
template <class T>
void MlpBlockT(const MlpBlockArgs& a) {
  const int64_t batch = a.x.dim(0), hidden = a.x.dim(1), inter = a.gate.rows();
  const WeightRef gate = RefOf(a.gate), up = RefOf(a.up);
  std::vector<T> act(size_t(batch * inter));
  {
    Panels<T> panels(a.x.ptr<const T>(), batch, hidden);
    const Panel* gate_panel = &panels.For(gate);
    const Panel* up_panel = &panels.For(up);
    const std::vector<RowRange> ranges = SplitRows({&gate, 1});
    ThreadPool::instance().parallel_for(int64_t(ranges.size()), [&](int64_t t) {
      const RowRange& r = ranges[size_t(t)];
      const int64_t count = r.end - r.begin;
      std::vector<float> g(size_t(batch * count)), u(size_t(batch * count));
      DotRows(gate, *gate_panel, r.begin, r.end, StablePlan(), g.data());
      DotRows(up, *up_panel, r.begin, r.end, StablePlan(), u.data());
      const DF df;
      const auto one = hn::Set(df, 1.0f);
      for (int64_t b = 0; b < batch; ++b) {
        const float* gb = g.data() + b * count;
        const float* ub = u.data() + b * count;
        T* dst = act.data() + b * inter + r.begin;
        int64_t i = 0;
        for (; i + kN <= count; i += kN) {
          const VF gv = hn::LoadU(df, gb + i);
          const VF sigmoid = hn::Div(one, hn::Add(one, hn::Exp(df, hn::Neg(gv))));
          StoreF32(df, hn::Mul(hn::Mul(gv, sigmoid), hn::LoadU(df, ub + i)), dst + i);
        }
        for (; i < count; ++i) dst[i] = from_f32<T>(gb[i] / (1.0f + std::exp(-gb[i])) * ub[i]);
      }
    });
  }
  RunMatvecs(Tensor::contiguous(act.data(), a.out.dtype, {batch, inter}), {&a.down, 1}, {&a.out, 1}, nullptr,
             StablePlan());
}

void MlpBlock(const MlpBlockArgs& a) {
  dispatch_activation(a.x.dtype, [&](auto tag) { MlpBlockT<decltype(tag)>(a); });
}

}  // namespace
}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace decodelab::cpu {

HWY_EXPORT(Matvec);
HWY_EXPORT(MatvecRowpar);
HWY_EXPORT(MatvecTiled);
HWY_EXPORT(MatvecMulti);
HWY_EXPORT(MatvecMultiTiled);
HWY_EXPORT(OutputProjection);
HWY_EXPORT(MlpBlock);

void matvec(const MatvecArgs& a) { HWY_DYNAMIC_DISPATCH(Matvec)(a); }
void matvec_rowpar(const MatvecArgs& a) { HWY_DYNAMIC_DISPATCH(MatvecRowpar)(a); }
void matvec_tiled(const MatvecArgs& a) { HWY_DYNAMIC_DISPATCH(MatvecTiled)(a); }
void matvec_multi(const MatvecMultiArgs& a) { HWY_DYNAMIC_DISPATCH(MatvecMulti)(a); }
void matvec_multi_tiled(const MatvecMultiArgs& a) { HWY_DYNAMIC_DISPATCH(MatvecMultiTiled)(a); }
void output_projection(const OutputProjectionArgs& a) { HWY_DYNAMIC_DISPATCH(OutputProjection)(a); }
void mlp_block(const MlpBlockArgs& a) { HWY_DYNAMIC_DISPATCH(MlpBlock)(a); }

}  // namespace decodelab::cpu
#endif  // HWY_ONCE
