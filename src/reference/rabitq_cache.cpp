// The paged RaBitQ-key / TurboQuant-value cache ops, the reference. The append encodes with
// RabitqKeys::encode and TurboQuantMse::encode (record_append.h). Fused decode attention: every
// score is RabitqKeys::estimate of the query against the key record (centroid term included),
// every value is TurboQuantMse::decode of its record, and plain attention runs over them in
// double. It shares nothing with the fused CPU kernel but the codecs, so it checks the fused
// algebra (scores against grid points in the rotated domain, values summed there).
#include <algorithm>
#include <vector>

#include "kvquant/rabitq_record.h"
#include "reference/decoded_attention.h"
#include "reference/kv_layout.h"
#include "reference/record_append.h"
#include "reference/reference.h"

namespace decodelab::reference {

void rabitq_append_rows(const RabitqAppendPagedArgs& a, int64_t row_begin, int64_t row_end) {
  append_record_rows(a.k_new, a.v_new, a.cache, row_begin, row_end);
}

void rabitq_append_paged(const RabitqAppendPagedArgs& a) { rabitq_append_rows(a, 0, append_record_row_count(a.k_new)); }

void rabitq_decode_attention_paged(const RabitqDecodeAttentionPagedArgs& a) {
  const PagedRecordLayout at(a.cache);
  const detail::ArgCheck check(a.kOp);
  const int64_t batch = a.q.dim(0), hq = a.q.dim(1), d = a.q.dim(2), hkv = at.heads();
  const int64_t group = hq / hkv;
  std::vector<float> decoded(static_cast<size_t>(d)), query(static_cast<size_t>(d));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = at.length(b);
    for (int64_t h = 0; h < hkv; ++h) {
      // Every record checked first, in the order the op names them, then the head's values
      // decoded, [length, d].
      std::vector<double> values(size_t(length * d));
      for (int64_t t = 0; t < length; ++t) {
        const int64_t index = at.record(b, h, t);
        detail::check_paged_rabitq_record(check, record_bytes(a.cache.k_pages, index).data(), "cache.k_pages", b, t, h);
        a.cache.v_codec->decode(checked_turboquant_record(a.kOp, a.cache.v_pages, "cache.v_pages", index, b, t, h),
                                decoded);
        std::copy(decoded.begin(), decoded.end(), values.begin() + t * d);
      }
      std::vector<double> scores(static_cast<size_t>(length));
      for (int64_t g = 0; g < group; ++g) {
        const int64_t q_at = (b * hq + h * group + g) * d;
        // f16 and bf16 widen to f32 exactly: the estimator sees the query as stored.
        for (int64_t j = 0; j < d; ++j) query[size_t(j)] = float(load(a.q, q_at + j));
        for (int64_t t = 0; t < length; ++t) {
          const std::span<const uint8_t> record = record_bytes(a.cache.k_pages, at.record(b, h, t));
          scores[size_t(t)] = a.options.scale * a.cache.k_codec->estimate(query, record);
        }
        attend_scores(a.out, q_at, scores, values, length);
      }
    }
  }
}

}  // namespace decodelab::reference
