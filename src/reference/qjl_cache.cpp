// The paged QJL-key / TurboQuant-value cache ops, the reference. The append encodes with
// QjlKeys::encode and TurboQuantMse::encode (record_append.h). Fused decode attention: every
// score is QjlKeys::estimate of the query against the key record (S q and the signed sum in
// double), every value is TurboQuantMse::decode of its record, and plain attention runs over them
// in double. It shares nothing with the fused CPU kernel but the codecs, so it checks the fused
// algebra (the query projected once, signs summed against it, values summed in V's rotated domain).
#include <span>

#include "kvquant/record.h"
#include "reference/decoded_attention.h"
#include "reference/record_append.h"
#include "reference/reference.h"

namespace decodelab::reference {

void qjl_append_paged(const QjlAppendPagedArgs& a) { append_records(a); }

void qjl_decode_attention_paged(const QjlDecodeAttentionPagedArgs& a) {
  const detail::ArgCheck check(a.kOp);
  estimated_key_attention(
      a,
      [&](const uint8_t* record, int64_t b, int64_t t, int64_t h) {
        const float norm = detail::load_f32_le(record);
        if (!detail::is_valid_norm(norm)) detail::fail_paged_record_norm(check, "cache.k_pages", b, t, h, norm);
      },
      // One S q per query head for all its keys (QjlKeys::score), as estimate() would per key.
      [&](std::span<const float> query, std::span<const uint8_t> records, std::span<double> scores) {
        a.cache.k_codec->score(query, records, scores);
      });
}

}  // namespace decodelab::reference
