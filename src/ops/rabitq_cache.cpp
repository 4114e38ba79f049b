// Validation and routing of fused decode attention over the paged RaBitQ-key / TurboQuant-value
// cache (include/decodelab/rabitq_cache.h).
#include <fmt/format.h>

#include "decodelab/rabitq_cache.h"
#include "ops/common.h"
#include "ops/record_cache_checks.h"
#include "router/registry.h"

namespace decodelab {

void rabitq_decode_attention_paged(const Tensor& q, const PagedRabitqKV& cache, const Tensor& out,
                                   const AttentionOptions& options, const RunOptions& run) {
  const detail::ArgCheck c("rabitq_decode_attention_paged");
  const AttentionOptions resolved = detail::check_record_attention(
      c, q, cache, out, options, run, "RabitqKeys", [](const kvquant::RabitqKeys& k) {
        return detail::KeyRecords{k.record_bytes(),
                                  fmt::format("a {}-bit record of D = {}", k.config().bits, k.config().head_dim)};
      });
  dispatch(RabitqDecodeAttentionPagedArgs{q, cache, out, resolved, run.stream}, run, q.device);
}

}  // namespace decodelab
