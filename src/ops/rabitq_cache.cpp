// Validation and routing of the paged RaBitQ-key / TurboQuant-value cache ops: the append and
// fused decode attention (include/decodelab/rabitq_cache.h).
#include <fmt/format.h>

#include "decodelab/rabitq_cache.h"
#include "ops/common.h"
#include "ops/record_cache_checks.h"
#include "router/registry.h"

namespace decodelab {

namespace {

// What the pools hold of a RabitqKeys codec (check_keyed_record_cache).
detail::KeyRecords rabitq_records(const kvquant::RabitqKeys& k) {
  return detail::KeyRecords{k.record_bytes(), detail::coordinate_records(k.config().bits, k.config().head_dim)};
}

}  // namespace

void rabitq_append_paged(const Tensor& k_new, const Tensor& v_new, const PagedRabitqKV& cache, const RunOptions& run) {
  const detail::ArgCheck c("rabitq_append_paged");
  const auto [batch, tokens, hkv, d] = detail::check_new_tokens(c, k_new, v_new, k_new.device);
  detail::check_keyed_record_cache(c, cache, "RabitqKeys", rabitq_records, batch, hkv, d, "k_new", k_new.device,
                                   tokens, 0, run.check_indices);
  dispatch(RabitqAppendPagedArgs{k_new, v_new, cache, run.stream}, run, k_new.device);
}

void rabitq_decode_attention_paged(const Tensor& q, const PagedRabitqKV& cache, const Tensor& out,
                                   const AttentionOptions& options, const RunOptions& run) {
  const detail::ArgCheck c("rabitq_decode_attention_paged");
  const AttentionOptions resolved =
      detail::check_record_attention(c, q, cache, out, options, run, "RabitqKeys", rabitq_records);
  dispatch(RabitqDecodeAttentionPagedArgs{q, cache, out, resolved, run.stream}, run, q.device);
}

}  // namespace decodelab
