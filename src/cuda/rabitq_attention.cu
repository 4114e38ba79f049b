// CUDA fused decode attention over the paged RaBitQ-key / TurboQuant-value cache
// (rabitq_cache.h): RaBitQ's estimator with the full-precision query, computed in the key
// rotation's domain straight from the codes; the value side is the TurboQuant kernel's. The algebra
// is the cpu kernel's (src/cpu/rabitq_attention.cpp): with q' = R_K q, token t scores
//   scale * n_t <y_t, q'> / (||y_t|| <o_bar, o>_t)
// (the centroid's <q, c> is the same for every token and drops out of the softmax), y_t its grid
// point y_j = u_j - (2^B - 1) / 2 from B bit planes of codes.
//
// The launches are turboquant_attention.cu's (q' = R_K q, record_attention.cuh's split kernel,
// the merge, out = R_V^T o') with the key policy below: a record is the norm, the correction and
// B planes of D / 32 words, so chunk c of a key row is word c of each plane, coordinate i its bit i.
#include "cuda/record_attention.cuh"

namespace decodelab::cuda {
namespace {

using namespace turboquant;

// RaBitQ keys of kBits bits (1: RaBitQ, 2-4: extended RaBitQ) for head_dim kD.
template <int kD, int kBits>
struct RabitqKeyCodes {
  struct Side {
    const uint8_t* pages;  // [num_pages, page_size, Hkv, Rk]
  };
  static constexpr int kPlaneWords = kD / 32;
  static constexpr int kWidth = kD, kWords = 2 + kBits * kPlaneWords;  // norm, correction, planes

  __device__ static int words(const Side&) { return kWords; }
  __device__ static void stage_table(const Side&, float*, int) {}
  __device__ static void expand(const Side&, const uint32_t* row, int c, const float*, float (&out)[32], float& sq) {
    uint32_t plane[kBits];
#pragma unroll
    for (int a = 0; a < kBits; ++a) plane[a] = row[2 + a * kPlaneWords + c];
    constexpr float kHalf = 0.5f * float((1 << kBits) - 1);
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      uint32_t code = 0;
#pragma unroll
      for (int a = 0; a < kBits; ++a) code |= ((plane[a] >> i) & 1u) << a;
      out[i] = float(code) - kHalf;
      sq = fmaf(out[i], out[i], sq);
    }
  }
  // n / (||y|| <o_bar, o>): ||y|| >= sqrt(D) / 2, as every |y_j| >= 1/2.
  __device__ static float factor(const Side&, const uint32_t* row, float sq) {
    return __uint_as_float(row[0]) / (sqrtf(sq) * __uint_as_float(row[1]));
  }
};

}  // namespace

void rabitq_decode_attention_paged(const RabitqDecodeAttentionPagedArgs& a) {
  const cudaStream_t stream = stream_of(a.stream);
  const cudaError_t status = dispatch_activation(a.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    DeviceRotation k_rot;
    if (const cudaError_t e = device_rotation(a.cache.k_codec->rotation(), stream, &k_rot); e != cudaSuccess) return e;
    const void* pages = a.cache.k_pages.data;
    return with_one_of<64, 96, 128, 256>(a.q.dim(2), [&](auto d) {
      return with_one_of<1, 2, 3, 4>(a.cache.k_codec->config().bits, [&](auto kb) {
        return with_one_of<2, 3, 4>(a.cache.v_codec->config().bits, [&](auto vb) {
          constexpr int kD = decltype(d)::value;
          using Keys = RabitqKeyCodes<kD, decltype(kb)::value>;
          return launch_record_split_attention<T, kD, Keys, decltype(vb)::value, false>(
              a, {static_cast<const uint8_t*>(pages)}, k_rot.forward_t, stream);
        });
      });
    });
  });
  check_launch(status, "rabitq_decode_attention_paged");
}

}  // namespace decodelab::cuda
