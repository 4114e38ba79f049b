// The paged RaBitQ-key / TurboQuant-value cache ops, the reference. The append encodes with
// RabitqKeys::encode and TurboQuantMse::encode (record_append.h). Fused decode attention: every
// score is RabitqKeys::estimate of the query against the key record (centroid term included),
// every value is TurboQuantMse::decode of its record, and plain attention runs over them in
// double. It shares nothing with the fused CPU kernel but the codecs, so it checks the fused
// algebra (scores against grid points in the rotated domain, values summed there).
#include <span>

#include "kvquant/rabitq_record.h"
#include "reference/decoded_attention.h"
#include "reference/record_append.h"
#include "reference/reference.h"

namespace decodelab::reference {

void rabitq_append_paged(const RabitqAppendPagedArgs& a) { append_records(a); }

void rabitq_decode_attention_paged(const RabitqDecodeAttentionPagedArgs& a) {
  const detail::ArgCheck check(a.kOp);
  const int64_t r = a.cache.k_codec->record_bytes();
  estimated_key_attention(
      a,
      [&](const uint8_t* record, int64_t b, int64_t t, int64_t h) {
        detail::check_paged_rabitq_record(check, record, "cache.k_pages", b, t, h);
      },
      // RabitqKeys::score is the quantized-query popcount score: each record gets estimate().
      [&](std::span<const float> query, std::span<const uint8_t> records, std::span<double> scores) {
        for (size_t t = 0; t < scores.size(); ++t) scores[t] = a.cache.k_codec->estimate(query, records.subspan(t * r, r));
      });
}

}  // namespace decodelab::reference
