// Fused decode attention over the paged KIVI cache, the reference: every key block and value
// record a sequence's head uses is decoded with KiviCodec (after its (lo, scale) pairs are checked,
// so that a corrupt one is named where it lies), the full-precision tokens are read from the
// ring, and plain attention runs over the decoded vectors in double. It shares nothing with the
// fused CPU kernel but the codec and the layout (kivi_cache.h).
#include <algorithm>
#include <span>
#include <vector>

#include "kvquant/kivi_record.h"
#include "reference/decoded_attention.h"
#include "reference/kv_layout.h"
#include "reference/reference.h"

namespace decodelab::reference {

void kivi_decode_attention_paged(const KiviDecodeAttentionPagedArgs& a) {
  const PagedKiviKV& c = a.cache;
  const kvquant::KiviCodec& codec = *c.codec;
  const kvquant::KiviConfig& config = codec.config();
  const detail::ArgCheck check(KiviDecodeAttentionPagedArgs::kOp);
  const int64_t batch = a.q.dim(0), hq = a.q.dim(1), d = a.q.dim(2), hkv = c.v_pages.dim(2);
  const int64_t page_size = c.v_pages.dim(1), g = config.key_group, window = c.recent_k.dim(1);
  const int64_t key_bytes = codec.key_block_bytes(), value_bytes = codec.value_record_bytes();
  const int64_t value_groups = d / config.value_group;
  std::vector<float> block(static_cast<size_t>(g * d)), value(static_cast<size_t>(d));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = load_index(c.lengths, b);
    const int64_t quantized_keys = detail::kivi_quantized_keys(length, g, config.residual);
    const int64_t quantized_values = detail::kivi_quantized_values(length, config.residual);
    for (int64_t h = 0; h < hkv; ++h) {
      // The head's keys and values decoded, [length, d] each, token by token in the order the
      // errors name records: a key block at its first token, before that token's value.
      std::vector<double> keys(size_t(length * d)), values(size_t(length * d));
      for (int64_t t = 0; t < length; ++t) {
        const int64_t slot = paged_slot(c.page_table, page_size, b, t);
        if (t < quantized_keys && t % g == 0) {
          const uint8_t* record = c.k_pages.ptr<uint8_t>() + (slot / g * hkv + h) * key_bytes;
          detail::check_kivi_pairs(check, record, d, detail::kivi_key_block_name(b, t, g, h));
          codec.decode_keys({record, size_t(key_bytes)}, block);
          std::copy(block.begin(), block.end(), keys.begin() + t * d);
        } else if (t >= quantized_keys) {
          const float* k = c.recent_k.ptr<float>() + ((b * window + t % window) * hkv + h) * d;
          std::copy(k, k + d, keys.begin() + t * d);
        }
        if (t < quantized_values) {
          const uint8_t* record = c.v_pages.ptr<uint8_t>() + (slot * hkv + h) * value_bytes;
          detail::check_kivi_pairs(check, record, value_groups, detail::kivi_value_record_name(b, t, h));
          codec.decode_value({record, size_t(value_bytes)}, value);
          std::copy(value.begin(), value.end(), values.begin() + t * d);
        } else {
          const float* v = c.recent_v.ptr<float>() + ((b * window + t % window) * hkv + h) * d;
          std::copy(v, v + d, values.begin() + t * d);
        }
      }
      attend_decoded(a.q, a.out, b, h, hq / hkv, a.options.scale, keys, values, length);
    }
  }
}

}  // namespace decodelab::reference
