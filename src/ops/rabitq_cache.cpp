// Validation and routing of fused decode attention over the paged RaBitQ-key / TurboQuant-value
// cache (include/decodelab/rabitq_cache.h).
#include <fmt/format.h>

#include "decodelab/rabitq_cache.h"
#include "ops/common.h"
#include "ops/record_cache_checks.h"
#include "router/registry.h"

namespace decodelab {

using detail::ArgCheck;
using detail::kAny;

void rabitq_decode_attention_paged(const Tensor& q, const PagedRabitqKV& cache, const Tensor& out,
                                   const AttentionOptions& options, const RunOptions& run) {
  const ArgCheck c("rabitq_decode_attention_paged");
  detail::check_heads(c, q, "q", "[B, Hq, D]");
  c.same_shape(out, "out", q, "q");
  c.same_dtype(out, "out", q.dtype, "the dtype of q");
  c.usable(out, "out", q.device);
  const AttentionOptions resolved = detail::resolve_attention_options(c, options, q.dim(2));
  const int64_t d = q.dim(2);
  // A key codec for another D reads records of another length, on another rotation.
  if (cache.k_codec == nullptr) c.fail("cache.k_codec", "a RabitqKeys codec", "null");
  const kvquant::RabitqKeys& k_codec = *cache.k_codec;
  if (k_codec.config().head_dim != d) {
    c.fail("cache.k_codec", fmt::format("a codec for head_dim D = {} (of q)", d),
           fmt::format("a codec for D = {}", k_codec.config().head_dim));
  }
  const kvquant::TurboQuantMse& v_codec = detail::check_turboquant_codec(c, cache.v_codec, "cache.v_codec", d, "q");
  if (cache.k_pages.rank != 4) c.fail("cache.k_pages", "rank 4 [num_pages, page_size, Hkv, R]", cache.k_pages.describe());
  const int64_t num_pages = cache.k_pages.dim(0), page_size = cache.k_pages.dim(1), hkv = cache.k_pages.dim(2);
  if (page_size < 1) c.fail("cache.k_pages", "page_size >= 1", cache.k_pages.describe());
  c.gqa(q.dim(1), hkv);
  detail::check_record_pool(c, cache.k_pages, "cache.k_pages", k_codec.record_bytes(), k_codec.config().bits, d,
                            "cache.k_codec", kAny, kAny, hkv, q.device);
  detail::check_record_pool(c, cache.v_pages, "cache.v_pages", v_codec.record_bytes(), v_codec.config().bits, d,
                            "cache.v_codec", num_pages, page_size, hkv, q.device);
  // Every sequence needs a token: a softmax over none has no value.
  detail::check_page_table(c, cache.page_table, cache.lengths, q.dim(0), num_pages, page_size, q.device, 0, 1,
                           run.check_indices);
  dispatch(RabitqDecodeAttentionPagedArgs{q, cache, out, resolved, run.stream}, run, q.device);
}

}  // namespace decodelab
