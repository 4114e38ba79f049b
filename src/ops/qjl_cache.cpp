// Validation and routing of the paged QJL-key / TurboQuant-value cache ops: the append and fused
// decode attention (include/decodelab/qjl_cache.h).
#include <fmt/format.h>

#include "decodelab/qjl_cache.h"
#include "ops/common.h"
#include "ops/record_cache_checks.h"
#include "router/registry.h"

namespace decodelab {

namespace {

// What the pools hold of a QjlKeys codec (check_keyed_record_cache). Every attention backend reads
// the signs 16 at a time (two whole bytes of the record), the reference so that it refuses what
// the fused kernels cannot run; the append refuses such a codec too, as no op could read the cache
// it would write.
auto qjl_records(const detail::ArgCheck& c) {
  return [&c](const kvquant::QjlKeys& k) {
    const int64_t m = k.config().sketch_dim;
    if (m % 16 != 0) {
      c.fail("cache.k_codec", "a sketch size m that is a multiple of 16", fmt::format("a codec with m = {} (sketch_dim)", m));
    }
    return detail::KeyRecords{k.record_bytes(), fmt::format("a 1-bit sketch of m = {}", m)};
  };
}

}  // namespace

void qjl_append_paged(const Tensor& k_new, const Tensor& v_new, const PagedQjlKV& cache, const RunOptions& run) {
  const detail::ArgCheck c("qjl_append_paged");
  const auto [batch, tokens, hkv, d] = detail::check_new_tokens(c, k_new, v_new, k_new.device);
  detail::check_keyed_record_cache(c, cache, "QjlKeys", qjl_records(c), batch, hkv, d, "k_new", k_new.device, tokens, 0,
                                   run.check_indices);
  dispatch(QjlAppendPagedArgs{k_new, v_new, cache, run.stream}, run, k_new.device);
}

void qjl_decode_attention_paged(const Tensor& q, const PagedQjlKV& cache, const Tensor& out,
                                const AttentionOptions& options, const RunOptions& run) {
  const detail::ArgCheck c("qjl_decode_attention_paged");
  const AttentionOptions resolved =
      detail::check_record_attention(c, q, cache, out, options, run, "QjlKeys", qjl_records(c));
  dispatch(QjlDecodeAttentionPagedArgs{q, cache, out, resolved, run.stream}, run, q.device);
}

}  // namespace decodelab
