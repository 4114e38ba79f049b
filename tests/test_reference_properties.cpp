// The reference is the oracle for everything else, so it is checked against properties that
// hold whatever the implementation: attention averages identical keys and its weights form a
// distribution, RoPE is a rotation that depends on relative position only, RMSNorm normalizes,
// quantization errs by at most half a step, and the reference's own paths agree with each other.
#include <gtest/gtest.h>

#include <cmath>

#include "decodelab/attention.h"
#include "decodelab/layers.h"
#include "decodelab/quant.h"
#include "verify/random.h"

namespace decodelab {
namespace {

using verify::random_array;
using verify::Rng;

const RunOptions kRef{"reference"};

float* f(const Array& a) { return a.ptr<float>(); }

TEST(ReferenceAttention, IdenticalKeysGiveTheMeanOfValues) {
  Rng rng(1);
  const int64_t len = 37, d = 64;
  Array q = random_array(DType::f32, {1, 1, 4, d}, rng);
  Array k(DType::f32, {1, 2, len, d}), v = random_array(DType::f32, {1, 2, len, d}, rng);
  Array one_key = random_array(DType::f32, {d}, rng);
  for (int64_t i = 0; i < k.numel(); ++i) f(k)[i] = f(one_key)[i % d];
  Array lengths = verify::i32_array({1}, {int32_t(len)});
  Array out(DType::f32, {1, 1, 4, d});
  decode_attention(q, {k, v, lengths}, out, {}, kRef);
  for (int64_t h = 0; h < 4; ++h) {
    for (int64_t c = 0; c < d; ++c) {
      double mean = 0.0;
      for (int64_t t = 0; t < len; ++t) mean += f(v)[((h / 2) * len + t) * d + c];
      EXPECT_NEAR(f(out)[h * d + c], mean / len, 1e-5);
    }
  }
}

TEST(ReferenceAttention, WeightsAreADistribution) {
  // V[t] = e_t reads the attention weights out: non-negative, summing to 1, largest at the key
  // most aligned with the query.
  Rng rng(2);
  const int64_t len = 40, d = 64;
  Array q = random_array(DType::f32, {1, 1, 1, d}, rng, 3.0);
  Array k = random_array(DType::f32, {1, len, 1, d}, rng);
  Array v(DType::f32, {1, len, 1, d});
  for (int64_t t = 0; t < len; ++t) {
    for (int64_t c = 0; c < d; ++c) f(v)[t * d + c] = c == t ? 1.0f : 0.0f;
  }
  Array out(DType::f32, {1, 1, 1, d});
  prefill_attention(q, k, v, out, {false, 0.0f}, kRef);
  double sum = 0.0;
  int64_t best = 0, best_weight = 0;
  double best_dot = -1e30, max_weight = -1.0;
  for (int64_t t = 0; t < len; ++t) {
    double dot = 0.0;
    for (int64_t c = 0; c < d; ++c) dot += double(f(q)[c]) * f(k)[t * d + c];
    if (dot > best_dot) best_dot = dot, best = t;
    if (f(out)[t] > max_weight) max_weight = f(out)[t], best_weight = t;
    EXPECT_GE(f(out)[t], 0.0f);
    sum += f(out)[t];
  }
  for (int64_t c = len; c < d; ++c) EXPECT_EQ(f(out)[c], 0.0f);
  EXPECT_NEAR(sum, 1.0, 1e-6);
  EXPECT_EQ(best_weight, best);
}

TEST(ReferenceAttention, LargeLogitsStayFinite) {
  Rng rng(3);
  Array q = random_array(DType::f16, {1, 8, 2, 64}, rng, 300.0);
  Array k = random_array(DType::f16, {1, 8, 2, 64}, rng, 10.0);
  Array v = random_array(DType::f16, {1, 8, 2, 64}, rng);
  Array out(DType::f16, {1, 8, 2, 64});
  prefill_attention(q, k, v, out, {}, kRef);
  for (int64_t i = 0; i < out.numel(); ++i) ASSERT_TRUE(std::isfinite(f16_to_f32(out.ptr<uint16_t>()[i])));
}

TEST(ReferenceAttention, CausalPrefillRowsEqualDecodeOverTheCacheAndPagedEqualsContiguous) {
  Rng rng(4);
  const int64_t s = 21, hq = 4, hkv = 2, d = 32, page = 4;
  Array q = random_array(DType::f32, {1, s, hq, d}, rng);
  Array k = random_array(DType::f32, {1, s, hkv, d}, rng), v = random_array(DType::f32, {1, s, hkv, d}, rng);
  Array prefill(DType::f32, {1, s, hq, d});
  prefill_attention(q, k, v, prefill, {}, kRef);
  // The same keys as a contiguous cache [1, Hkv, S, D] and as pages in reverse order.
  Array kc(DType::f32, {1, hkv, s, d}), vc(DType::f32, {1, hkv, s, d});
  const int64_t pages = (s + page - 1) / page;
  Array kp(DType::f32, {pages, page, hkv, d}), vp(DType::f32, {pages, page, hkv, d});
  std::vector<int32_t> table;
  for (int64_t p = 0; p < pages; ++p) table.push_back(int32_t(pages - 1 - p));
  for (int64_t t = 0; t < s; ++t) {
    for (int64_t h = 0; h < hkv; ++h) {
      for (int64_t c = 0; c < d; ++c) {
        const int64_t src = (t * hkv + h) * d + c;
        f(kc)[(h * s + t) * d + c] = f(k)[src];
        f(vc)[(h * s + t) * d + c] = f(v)[src];
        const int64_t dst = ((table[size_t(t / page)] * page + t % page) * hkv + h) * d + c;
        f(kp)[dst] = f(k)[src];
        f(vp)[dst] = f(v)[src];
      }
    }
  }
  Array table_t = verify::i32_array({1, pages}, table);
  for (int64_t t : {int64_t{0}, int64_t{7}, s - 1}) {
    // Query t sees keys 0..t: a cache of length t + 1.
    Array lengths = verify::i32_array({1}, {int32_t(t + 1)});
    Array qt(DType::f32, {1, 1, hq, d}), contiguous(DType::f32, {1, 1, hq, d}), paged(DType::f32, {1, 1, hq, d});
    std::copy(f(q) + t * hq * d, f(q) + (t + 1) * hq * d, f(qt));
    decode_attention(qt, {kc, vc, lengths}, contiguous, {}, kRef);
    decode_attention_paged(qt, {kp, vp, table_t, lengths}, paged, {}, kRef);
    for (int64_t i = 0; i < hq * d; ++i) {
      EXPECT_NEAR(contiguous.ptr<float>()[i], f(prefill)[t * hq * d + i], 1e-6);
      EXPECT_EQ(paged.ptr<float>()[i], contiguous.ptr<float>()[i]);
    }
  }
}

struct RopeStyleCase {
  RopeParams params;
  const char* name;
};

void PrintTo(const RopeStyleCase& c, std::ostream* os) { *os << c.name; }

class ReferenceRope : public ::testing::TestWithParam<RopeStyleCase> {};

TEST_P(ReferenceRope, PreservesNormsAndDependsOnRelativePositionOnly) {
  const RopeParams params = GetParam().params;
  Rng rng(5);
  const int64_t d = 128;
  Array x = random_array(DType::f32, {4, 1, d}, rng);
  // Rows 0 and 1 are q and k at positions (m, n); rows 2 and 3 the same vectors at (m + 1000, n + 1000).
  std::copy(f(x), f(x) + 2 * d, f(x) + 2 * d);
  Array positions = verify::i32_array({4}, {37, 5, 1037, 1005});
  Array out(DType::f32, {4, 1, d});
  rope(x, positions, params, out, kRef);
  for (int64_t r = 0; r < 4; ++r) {
    double n_in = 0.0, n_out = 0.0;
    for (int64_t c = 0; c < d; ++c) {
      n_in += double(f(x)[r * d + c]) * f(x)[r * d + c];
      n_out += double(f(out)[r * d + c]) * f(out)[r * d + c];
    }
    EXPECT_NEAR(std::sqrt(n_out), std::sqrt(n_in), 1e-5 * std::sqrt(n_in));
  }
  double near = 0.0, far = 0.0;
  for (int64_t c = 0; c < d; ++c) {
    near += double(f(out)[c]) * f(out)[d + c];
    far += double(f(out)[2 * d + c]) * f(out)[3 * d + c];
  }
  EXPECT_NEAR(near, far, 1e-3);
  // And it did rotate: position 37 moves the vector.
  double moved = 0.0;
  for (int64_t c = 0; c < d; ++c) moved += std::fabs(f(out)[c] - f(x)[c]);
  EXPECT_GT(moved, 1.0);
}

INSTANTIATE_TEST_SUITE_P(Styles, ReferenceRope,
                         ::testing::Values(RopeStyleCase{RopeParams{}, "half_split"},
                                           RopeStyleCase{RopeParams{10000.0f, RopeStyle::interleaved}, "interleaved"},
                                           RopeStyleCase{RopeParams{500000.0f, RopeStyle::half_split, 0, true}, "llama3"},
                                           RopeStyleCase{RopeParams{10000.0f, RopeStyle::half_split, 64}, "partial"}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(ReferenceRope, Llama3ScalingFollowsTheThreeBands) {
  RopeParams p{500000.0f, RopeStyle::half_split, 128, true, {8.0f, 1.0f, 4.0f, 8192}};
  RopeParams plain = p;
  plain.llama3_scaling = false;
  // Pair 0: wavelength 2*pi, far below 8192/4: unchanged. Last pair: wavelength far above 8192:
  // divided by the factor. Somewhere between: blended, strictly between the two.
  EXPECT_DOUBLE_EQ(rope_inv_frequency(p, 128, 0), rope_inv_frequency(plain, 128, 0));
  EXPECT_DOUBLE_EQ(rope_inv_frequency(p, 128, 63), rope_inv_frequency(plain, 128, 63) / 8.0);
  int blended = 0;
  for (int i = 0; i < 64; ++i) {
    const double scaled = rope_inv_frequency(p, 128, i), base = rope_inv_frequency(plain, 128, i);
    if (scaled < base && scaled > base / 8.0) ++blended;
  }
  EXPECT_GT(blended, 0);
}

TEST(ReferenceRmsNorm, UnitRmsBeforeTheWeight) {
  Rng rng(6);
  Array x = random_array(DType::f32, {3, 4096}, rng, 5.0, 1.0);
  Array w(DType::f32, {4096});
  verify::fill_value(w, 1.0);
  Array out(DType::f32, {3, 4096});
  rms_norm(x, w, 1e-6f, out, kRef);
  for (int64_t r = 0; r < 3; ++r) {
    double ss = 0.0;
    for (int64_t i = 0; i < 4096; ++i) ss += double(f(out)[r * 4096 + i]) * f(out)[r * 4096 + i];
    EXPECT_NEAR(std::sqrt(ss / 4096), 1.0, 1e-6);
  }
}

// The integer code of element (r, k) as stored, for the checks below.
int code_of(const QuantizedArray& q, int64_t r, int64_t k) {
  const QuantizedWeight& w = q.weight;
  if (w.spec.format == QuantFormat::mlx_affine) {
    const int per_word = 32 / w.spec.bits;
    const uint32_t word = q.packed.ptr<uint32_t>()[r * (w.cols / per_word) + k / per_word];
    return int((word >> ((k % per_word) * w.spec.bits)) & ((1u << w.spec.bits) - 1));
  }
  const uint8_t* block = q.packed.ptr<uint8_t>() + (r * (w.cols / 32) + k / 32) * gguf_block_bytes(w.spec.format);
  if (w.spec.format == QuantFormat::gguf_q8_0) return int(int8_t(block[2 + k % 32]));
  return k % 32 < 16 ? block[2 + k % 32] & 0xF : block[2 + k % 16] >> 4;
}

// |w - dequantize(quantize(w))| is at most half a quantization step, except for codes clamped at
// the top of the range: both owners anchor one edge of the group exactly (MLX its larger-magnitude
// edge, Q4_0 its largest magnitude at -8), and rounding that anchor can push the other edge one
// code past the top, where it is clamped and errs by at most one step.
TEST(ReferenceQuant, RoundTripWithinHalfAStepExceptClampedTopCodes) {
  Rng rng(7);
  const int64_t rows = 16, cols = 256;
  Array w = random_array(DType::f32, {rows, cols}, rng, 0.02);
  for (const QuantSpec spec : {QuantSpec::mlx(4, 32), QuantSpec::mlx(4, 64), QuantSpec::mlx(4, 128),
                               QuantSpec::mlx(8, 32), QuantSpec::mlx(8, 64), QuantSpec::mlx(8, 128),
                               QuantSpec::q4_0(), QuantSpec::q8_0()}) {
    SCOPED_TRACE(quant_spec_name(spec));
    // f32 scales so that the step itself is not rounded (MLX computes q from the f32 scale).
    QuantizedArray q = make_quantized(spec, rows, cols, DType::f32);
    quantize(w, q.weight, kRef);
    Array back(DType::f32, {rows, cols});
    dequantize(q.weight, back, kRef);
    const int top_code = spec.format == QuantFormat::mlx_affine ? (1 << spec.bits) - 1
                         : spec.format == QuantFormat::gguf_q4_0 ? 15 : 127;
    // GGUF stores its step in f16 after q is chosen with the f32 step: |q| times that rounding
    // (at most 2^-11 relative) comes on top.
    const double q_max = spec.format == QuantFormat::gguf_q8_0 ? 127 : 8;
    int64_t beyond_half = 0;
    for (int64_t i = 0; i < rows * cols; ++i) {
      const int64_t r = i / cols, k = i % cols, g = k / spec.group_size;
      double step;
      if (spec.format == QuantFormat::mlx_affine) {
        step = std::fabs(q.scales.ptr<float>()[r * (cols / spec.group_size) + g]);
      } else {
        const uint8_t* block = q.packed.ptr<uint8_t>() + (r * (cols / 32) + g) * gguf_block_bytes(spec.format);
        step = std::fabs(f16_to_f32(uint16_t(block[0] | (block[1] << 8))));
      }
      // MLX works in f32 on values up to top_code steps from the bias: a few f32 roundings there.
      const double stored_step_error = spec.format == QuantFormat::mlx_affine ? top_code * step * std::ldexp(1.0, -22)
                                                                                : q_max * step * std::ldexp(1.0, -11);
      const double err = std::fabs(double(f(back)[i]) - f(w)[i]);
      const double half = 0.5 * step + stored_step_error + 1e-9;
      if (err <= half) continue;
      ++beyond_half;
      EXPECT_EQ(code_of(q, r, k), top_code) << "element " << i << " errs by " << err / step << " steps";
      EXPECT_LE(err, step + stored_step_error + 1e-9) << "element " << i;
    }
    EXPECT_LT(beyond_half, rows * cols / 20);
  }
}

}  // namespace
}  // namespace decodelab
