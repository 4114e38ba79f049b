// The paged TurboQuant cache ops, the reference: the append encodes with TurboQuantMse::encode,
// and decode attention decodes every record with TurboQuantMse::decode and then runs plain
// attention over the decoded vectors in double. It shares nothing with the fused CPU kernel but
// the codec, so it checks the fused algebra (scores and values in the rotated domain).
#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "reference/decoded_attention.h"
#include "reference/kv_layout.h"
#include "reference/record_append.h"
#include "reference/reference.h"

namespace decodelab::reference {

void turboquant_append_paged(const TurboQuantAppendPagedArgs& a) { append_records(a); }

void turboquant_decode_attention_paged(const TurboQuantDecodeAttentionPagedArgs& a) {
  const PagedRecordLayout at(a.cache);
  const int64_t batch = a.q.dim(0), hq = a.q.dim(1), d = a.q.dim(2), hkv = at.heads();
  const int64_t group = hq / hkv;
  std::vector<float> decoded(static_cast<size_t>(d));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = at.length(b);
    for (int64_t h = 0; h < hkv; ++h) {
      // The head's keys and values decoded, [length, d] each.
      std::vector<double> keys(size_t(length * d)), values(size_t(length * d));
      for (int64_t t = 0; t < length; ++t) {
        const int64_t index = at.record(b, h, t);
        a.cache.k_codec->decode(
            checked_turboquant_record(a.kOp, a.cache.k_pages, "cache.k_pages", index, b, t, h), decoded);
        std::copy(decoded.begin(), decoded.end(), keys.begin() + t * d);
        a.cache.v_codec->decode(
            checked_turboquant_record(a.kOp, a.cache.v_pages, "cache.v_pages", index, b, t, h), decoded);
        std::copy(decoded.begin(), decoded.end(), values.begin() + t * d);
      }
      attend_decoded(a.q, a.out, b, h, group, a.options.scale, keys, values, length);
    }
  }
}

}  // namespace decodelab::reference
