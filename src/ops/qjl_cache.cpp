// Validation and routing of fused decode attention over the paged QJL-key / TurboQuant-value
// cache (include/decodelab/qjl_cache.h).
#include <fmt/format.h>

#include "decodelab/qjl_cache.h"
#include "ops/common.h"
#include "ops/record_cache_checks.h"
#include "router/registry.h"

namespace decodelab {

void qjl_decode_attention_paged(const Tensor& q, const PagedQjlKV& cache, const Tensor& out,
                                const AttentionOptions& options, const RunOptions& run) {
  const detail::ArgCheck c("qjl_decode_attention_paged");
  const AttentionOptions resolved =
      detail::check_record_attention(c, q, cache, out, options, run, "QjlKeys", [&](const kvquant::QjlKeys& k) {
        const int64_t m = k.config().sketch_dim;
        // Every backend reads the signs 16 at a time (two whole bytes of the record): the
        // reference so that it refuses what the fused kernels cannot run.
        if (m % 16 != 0) {
          c.fail("cache.k_codec", "a sketch size m that is a multiple of 16",
                 fmt::format("a codec with m = {} (sketch_dim)", m));
        }
        return detail::KeyRecords{k.record_bytes(), fmt::format("a 1-bit sketch of m = {}", m)};
      });
  dispatch(QjlDecodeAttentionPagedArgs{q, cache, out, resolved, run.stream}, run, q.device);
}

}  // namespace decodelab
