// Validation and routing of the paged TurboQuant cache ops: the append and fused decode attention
// (include/decodelab/turboquant_cache.h).
#include "decodelab/turboquant_cache.h"
#include "ops/common.h"
#include "ops/record_cache_checks.h"
#include "router/registry.h"

namespace decodelab {

using detail::ArgCheck;
using detail::check_heads;

namespace {

// The whole cache against B sequences of Hkv heads of dimension D, on `device`, as
// check_record_cache.
void check_cache(const ArgCheck& c, const PagedTurboQuantKV& cache, int64_t batch, int64_t hkv, int64_t d,
                 const char* d_of, Device device, int64_t extra, int64_t min_length, bool check_values) {
  const kvquant::TurboQuantMse& k_codec = detail::check_turboquant_codec(c, cache.k_codec, "cache.k_codec", d, d_of);
  detail::check_record_cache(c, cache, {k_codec.record_bytes(), detail::coordinate_records(k_codec.config().bits, d)},
                             batch, hkv, d, d_of, device, extra, min_length, check_values);
}

}  // namespace

void turboquant_append_paged(const Tensor& k_new, const Tensor& v_new, const PagedTurboQuantKV& cache,
                             const RunOptions& run) {
  const ArgCheck c("turboquant_append_paged");
  check_heads(c, k_new, "k_new", "[B, Hkv, D]");
  c.same_shape(v_new, "v_new", k_new, "k_new");
  c.same_dtype(v_new, "v_new", k_new.dtype, "the dtype of k_new");
  c.usable(v_new, "v_new", k_new.device);
  check_cache(c, cache, k_new.dim(0), k_new.dim(1), k_new.dim(2), "k_new", k_new.device, 1, 0, run.check_indices);
  dispatch(TurboQuantAppendPagedArgs{k_new, v_new, cache, run.stream}, run, k_new.device);
}

void turboquant_decode_attention_paged(const Tensor& q, const PagedTurboQuantKV& cache, const Tensor& out,
                                       const AttentionOptions& options, const RunOptions& run) {
  const ArgCheck c("turboquant_decode_attention_paged");
  const AttentionOptions resolved = detail::check_attention_query(c, q, cache, out, options);
  // Every sequence needs a token: a softmax over none has no value.
  check_cache(c, cache, q.dim(0), cache.k_pages.dim(2), q.dim(2), "q", q.device, 0, 1, run.check_indices);
  dispatch(TurboQuantDecodeAttentionPagedArgs{q, cache, out, resolved, run.stream}, run, q.device);
}

}  // namespace decodelab
