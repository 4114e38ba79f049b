// CUDA fused decode attention over the paged TurboQuant (MSE) cache (turboquant_cache.h): scores
// and the value sum in the rotated domain, straight from the codes; the cache is never decoded
// into memory. The algebra is the cpu kernel's (src/cpu/turboquant_attention.cpp): with
// q' = R_K q, token t scores scale * n_t s_t sum_j q'_j c_K[idx_tj], the softmax weights p_t sum
// o' = sum_t p_t n_t s_t c_V[idx_t] in V's rotated domain, and out = R_V^T o'.
//
// Four launches, all on the call's stream:
//   1. rotate_rows: q' = scale * log2(e) * R_K q for every (b, query head), f32 scratch; a block
//      takes up to 8 query heads of one sequence and reads R_K^T once for them (the rotation is a
//      dense f32 matrix on the device, uploaded once per rotation: turboquant_tables.h).
//   2. record_attention.cuh's split kernel with the key policy below: per 32 coordinates (exactly
//      `bits` words of a record, `bits` + 1 in the wide part of a split width) a key's indices
//      expand into centroids from a table in shared memory; its factor is n s
//      (s = 1 / ||c[idx]|| norm-corrected, else 1).
//   3. decode_attention.cuh's merge kernel over the splits (log-sum-exp, fixed order), into o'.
//   4. rotate_rows: out = R_V^T o', back in q's dtype.
// Splits as decode_attention.cuh's choose_splits (at least 128 tokens each); every order is
// fixed, so results are the same bits run to run.
#include "cuda/record_attention.cuh"

namespace decodelab::cuda {
namespace {

using namespace turboquant;

// TurboQuant keys of kBits bits (kSplit: a split width of kBits and kBits + 1 bits, or any) for
// head_dim kD (record_attention.cuh's key policy).
template <int kD, int kBits, bool kSplit>
struct TurboQuantKeyCodes {
  using Side = CodeSide;
  static constexpr int kWidth = kD, kWords = kTurboQuantWords<kD, kBits, kSplit>;

  __device__ static int words(const Side& side) { return kSplit ? side.words : kWords; }
  __device__ static void stage_table(const Side& side, float* table, int tid) { stage_turboquant_table(side, table, tid); }
  __device__ static void expand(const Side& side, const uint32_t* row, int c, const float* table, float (&out)[32],
                                float& sq) {
    expand_turboquant_chunk<kBits, kSplit>(side, row, c, table, out, sq);
  }
  __device__ static float factor(const Side& side, const uint32_t* row, float sq) {
    const float norm = __uint_as_float(row[0]);
    return side.norm_corrected ? norm / sqrtf(sq) : norm;
  }
};

// The kernel for codecs of bits kKBits and kVBits, split or not: q' = R_K q.
template <class T, int kD, int kKBits, int kVBits, bool kSplit>
cudaError_t launch(const TurboQuantDecodeAttentionPagedArgs& a, cudaStream_t stream) {
  DeviceRotation k_rot;
  if (const cudaError_t e = device_rotation(a.cache.k_codec->rotation(), stream, &k_rot); e != cudaSuccess) return e;
  return launch_record_split_attention<T, kD, TurboQuantKeyCodes<kD, kKBits, kSplit>, kVBits, kSplit>(
      a, make_side(a.cache.k_pages, *a.cache.k_codec), k_rot.forward_t, stream);
}

}  // namespace

void turboquant_decode_attention_paged(const TurboQuantDecodeAttentionPagedArgs& a) {
  const cudaStream_t stream = stream_of(a.stream);
  const cudaError_t status = dispatch_activation(a.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    return with_one_of<64, 96, 128, 256>(a.q.dim(2), [&](auto d) {
      return with_one_of<2, 3, 4>(a.cache.k_codec->config().bits, [&](auto kb) {
        return with_one_of<2, 3, 4>(a.cache.v_codec->config().bits, [&](auto vb) {
          constexpr int kD = decltype(d)::value, kKBits = decltype(kb)::value, kVBits = decltype(vb)::value;
          const bool split = a.cache.k_codec->config().high_bits_channels > 0 ||
                             a.cache.v_codec->config().high_bits_channels > 0;
          if constexpr (kKBits < 4 || kVBits < 4) {
            if (split) return launch<T, kD, kKBits, kVBits, true>(a, stream);
          }
          return launch<T, kD, kKBits, kVBits, false>(a, stream);
        });
      });
    });
  });
  check_launch(status, "turboquant_decode_attention_paged");
}

}  // namespace decodelab::cuda
