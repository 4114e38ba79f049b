// Validation and routing of attention: prefill and attention over contiguous and paged caches.
#include <fmt/format.h>

#include "decodelab/attention.h"
#include "ops/common.h"
#include "router/registry.h"

namespace decodelab {

using detail::ArgCheck;
using detail::kAny;

namespace {

// q = [B, Sq, Hq, D] and out of the same shape; returns the options with the scale resolved.
AttentionOptions check_queries(const ArgCheck& c, const Tensor& q, const Tensor& out,
                               const AttentionOptions& options) {
  c.shape(q, "q", {kAny, kAny, kAny, kAny}, "[B, Sq, Hq, D]");
  c.activation(q, "q");
  c.usable(q, "q", q.device);
  if (q.dim(0) < 1) c.fail("q", "a batch B >= 1", q.describe());
  if (q.dim(1) < 1 || q.dim(2) < 1) c.fail("q", "Sq >= 1 and Hq >= 1", q.describe());
  c.head_dim(q.dim(3), "q");
  c.same_shape(out, "out", q, "q");
  c.same_dtype(out, "out", q.dtype, "the dtype of q");
  c.usable(out, "out", q.device);
  return detail::resolve_attention_options(c, options, q.dim(3));
}

}  // namespace

void prefill_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                       const AttentionOptions& options, const RunOptions& run) {
  const ArgCheck c("prefill_attention");
  const AttentionOptions resolved = check_queries(c, q, out, options);
  c.shape(k, "k", {q.dim(0), kAny, kAny, q.dim(3)}, "[B, Skv, Hkv, D]");
  c.same_shape(v, "v", k, "k");
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    c.same_dtype(*t, name, q.dtype, "the dtype of q");
    c.usable(*t, name, q.device);
  }
  c.gqa(q.dim(2), k.dim(2));
  if (k.dim(1) < 1) c.fail("k", "Skv >= 1", k.describe());
  if (options.causal && q.dim(1) > k.dim(1)) {
    c.fail("q", fmt::format("Sq <= Skv = {} for causal attention", k.dim(1)), q.describe());
  }
  dispatch(PrefillAttentionArgs{q, k, v, out, resolved, run.stream}, run, q.device);
}

void decode_attention(const Tensor& q, const ContiguousKV& cache, const Tensor& out,
                      const AttentionOptions& options, const RunOptions& run) {
  const ArgCheck c("decode_attention");
  const AttentionOptions resolved = check_queries(c, q, out, options);
  if (cache.k.rank != 4) c.fail("cache.k", "rank 4 [B, Hkv, S_max, D]", cache.k.describe());
  c.gqa(q.dim(2), cache.k.dim(1));
  detail::check_contiguous_kv(c, cache, q.dim(0), cache.k.dim(1), q.dim(3), q.dtype, q.device, 0, q.dim(1), run.check_indices);
  dispatch(DecodeAttentionArgs{q, cache, out, resolved, run.stream}, run, q.device);
}

void decode_attention_paged(const Tensor& q, const PagedKV& cache, const Tensor& out,
                            const AttentionOptions& options, const RunOptions& run) {
  const ArgCheck c("decode_attention_paged");
  const AttentionOptions resolved = check_queries(c, q, out, options);
  if (cache.k_pages.rank != 4) {
    c.fail("cache.k_pages", "rank 4 [num_pages, page_size, Hkv, D]", cache.k_pages.describe());
  }
  c.gqa(q.dim(2), cache.k_pages.dim(2));
  detail::check_paged_kv(c, cache, q.dim(0), cache.k_pages.dim(2), q.dim(3), q.dtype, q.device, 0, q.dim(1), run.check_indices);
  dispatch(DecodeAttentionPagedArgs{q, cache, out, resolved, run.stream}, run, q.device);
}

}  // namespace decodelab
