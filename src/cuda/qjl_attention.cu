// CUDA fused decode attention over the paged QJL-key / TurboQuant-value cache (qjl_cache.h): QJL's
// asymmetric estimator with the full-precision query, computed in the sketch's domain straight from
// the sign bits; the value side is the TurboQuant kernel's. The algebra is the cpu kernel's
// (src/cpu/qjl_attention.cpp): with q' = S q (m values per query head), token t scores
//   scale * sqrt(pi/2) / m * n_t sum_i q'_i s_ti,
// s_ti = -1 where bit i of its record is 1, else +1. The query is never sign-quantized.
//
// The launches are turboquant_attention.cu's with q' = S q (the sketch uploaded once as an
// f32 D x m matrix: turboquant_tables.h) and the key policy below: a record is the norm and m / 32
// words of signs, so chunk c of a key row is word c.
#include <cmath>
#include <numbers>

#include "cuda/record_attention.cuh"

namespace decodelab::cuda {
namespace {

using namespace turboquant;

// QJL keys with a sketch of kM rows.
template <int kM>
struct QjlKeyCodes {
  struct Side {
    const uint8_t* pages;  // [num_pages, page_size, Hkv, Rk]
    float factor;          // sqrt(pi/2) / m
  };
  static constexpr int kWidth = kM, kWords = 1 + kM / 32;  // norm, signs

  __device__ static int words(const Side&) { return kWords; }
  __device__ static void stage_table(const Side&, float*, int) {}
  __device__ static void expand(const Side&, const uint32_t* row, int c, const float*, float (&out)[32], float&) {
    const uint32_t signs = row[1 + c];
#pragma unroll
    for (int i = 0; i < 32; ++i) out[i] = (signs >> i) & 1u ? -1.0f : 1.0f;
  }
  __device__ static float factor(const Side& side, const uint32_t* row, float) {
    return side.factor * __uint_as_float(row[0]);
  }
};

}  // namespace

void qjl_decode_attention_paged(const QjlDecodeAttentionPagedArgs& a) {
  const cudaStream_t stream = stream_of(a.stream);
  const kvquant::QjlKeys& k_codec = *a.cache.k_codec;
  const cudaError_t status = dispatch_activation(a.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    DeviceSketch sketch;
    if (const cudaError_t e = device_sketch(k_codec, stream, &sketch); e != cudaSuccess) return e;
    const int64_t m = k_codec.config().sketch_dim;
    const float factor = float(std::sqrt(std::numbers::pi / 2.0) / double(m));
    const auto* pages = static_cast<const uint8_t*>(a.cache.k_pages.data);
    return with_one_of<64, 96, 128, 256>(a.q.dim(2), [&](auto d) {
      return with_one_of<64, 128, 256, 512>(m, [&](auto sketch_rows) {
        return with_one_of<2, 3, 4>(a.cache.v_codec->config().bits, [&](auto vb) {
          constexpr int kD = decltype(d)::value;
          using Keys = QjlKeyCodes<decltype(sketch_rows)::value>;
          return launch_record_split_attention<T, kD, Keys, decltype(vb)::value, false>(a, {pages, factor},
                                                                                        sketch.projection_t, stream);
        });
      });
    });
  });
  check_launch(status, "qjl_decode_attention_paged");
}

}  // namespace decodelab::cuda
