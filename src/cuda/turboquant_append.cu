// CUDA append to the paged TurboQuant cache (turboquant_cache.h): each new token's K and V head
// vectors encoded into their records by turboquant_encode.cuh's kernel, codes bit-exact with
// TurboQuantMse::encode (kvquant.h). One launch: a block per (token row, K or V).
#include "cuda/turboquant_encode.cuh"

namespace decodelab::cuda {

void turboquant_append_paged(const TurboQuantAppendPagedArgs& a) {
  using namespace turboquant;
  constexpr const char* kOp = "turboquant_append_paged";
  const cudaStream_t stream = stream_of(a.stream);
  const PagedTurboQuantKV& c = a.cache;
  EncodeParams p{};
  p.side[0] = make_encode_side(a.k_new, c.k_pages, *c.k_codec, stream, kOp);
  p.side[1] = make_encode_side(a.v_new, c.v_pages, *c.v_codec, stream, kOp);
  p.target = append_target(a.k_new, c);
  p.dim = int(a.k_new.dim(a.k_new.rank - 1));
  const dim3 grid(unsigned(token_rows(a.k_new)), 2);
  dispatch_activation(a.k_new.dtype, [&](auto tag) {
    using T = decltype(tag);
    encode_kernel<T><<<grid, kMaxDim, 0, stream>>>(p);
  });
  check_launch(cudaGetLastError(), kOp);
}

}  // namespace decodelab::cuda
