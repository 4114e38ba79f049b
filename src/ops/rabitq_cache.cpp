// Validation and routing of the paged RaBitQ-key / TurboQuant-value cache ops: the append and
// fused decode attention (include/decodelab/rabitq_cache.h).
#include <fmt/format.h>

#include "decodelab/rabitq_cache.h"
#include "ops/common.h"
#include "ops/record_cache_checks.h"
#include "router/registry.h"

namespace decodelab {

using detail::ArgCheck;

namespace {

// The whole cache against B sequences of Hkv heads of dimension D (of `d_of`), as
// check_record_cache. A key codec for another D reads records of another length, on another
// rotation.
void check_cache(const ArgCheck& c, const PagedRabitqKV& cache, int64_t batch, int64_t hkv, int64_t d,
                 const char* d_of, Device device, int64_t extra, int64_t min_length, bool check_values) {
  if (cache.k_codec == nullptr) c.fail("cache.k_codec", "a RabitqKeys codec", "null");
  const kvquant::RabitqKeys& k_codec = *cache.k_codec;
  if (k_codec.config().head_dim != d) {
    c.fail("cache.k_codec", fmt::format("a codec for head_dim D = {} (of {})", d, d_of),
           fmt::format("a codec for D = {}", k_codec.config().head_dim));
  }
  detail::check_record_cache(c, cache, k_codec.record_bytes(), k_codec.config().bits, batch, hkv, d, d_of, device,
                             extra, min_length, check_values);
}

}  // namespace

void rabitq_append_paged(const Tensor& k_new, const Tensor& v_new, const PagedRabitqKV& cache, const RunOptions& run) {
  const ArgCheck c("rabitq_append_paged");
  const auto [batch, tokens, hkv, d] = detail::check_new_tokens(c, k_new, v_new, k_new.device);
  check_cache(c, cache, batch, hkv, d, "k_new", k_new.device, tokens, 0, run.check_indices);
  dispatch(RabitqAppendPagedArgs{k_new, v_new, cache, run.stream}, run, k_new.device);
}

void rabitq_decode_attention_paged(const Tensor& q, const PagedRabitqKV& cache, const Tensor& out,
                                   const AttentionOptions& options, const RunOptions& run) {
  const ArgCheck c("rabitq_decode_attention_paged");
  detail::check_heads(c, q, "q", "[B, Hq, D]");
  c.same_shape(out, "out", q, "q");
  c.same_dtype(out, "out", q.dtype, "the dtype of q");
  c.usable(out, "out", q.device);
  const AttentionOptions resolved = detail::resolve_attention_options(c, options, q.dim(2));
  if (cache.k_pages.rank != 4) c.fail("cache.k_pages", "rank 4 [num_pages, page_size, Hkv, R]", cache.k_pages.describe());
  c.gqa(q.dim(1), cache.k_pages.dim(2));
  // Every sequence needs a token: a softmax over none has no value.
  check_cache(c, cache, q.dim(0), cache.k_pages.dim(2), q.dim(2), "q", q.device, 0, 1, run.check_indices);
  dispatch(RabitqDecodeAttentionPagedArgs{q, cache, out, resolved, run.stream}, run, q.device);
}

}  // namespace decodelab
