// The paged KIVI cache ops, the reference. The append runs KiviCache's rule token by token
// (kivi_cache.h) with KiviCodec's encoders, reading the quantized tokens back from the ring.
// Fused decode attention: every key block and value
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
#include "reference/record_append.h"
#include "reference/reference.h"

namespace decodelab::reference {

void kivi_append_rows(const KiviAppendPagedArgs& a, int64_t row_begin, int64_t row_end) {
  const PagedKiviKV& c = a.cache;
  const kvquant::KiviCodec& codec = *c.codec;
  const int64_t g = codec.config().key_group, residual = codec.config().residual;
  const NewTokens n(a.k_new);
  const int64_t tokens = n.tokens, hkv = n.heads, d = n.d;
  const int64_t page_size = c.v_pages.dim(1), window = c.recent_k.dim(1);
  const int64_t key_bytes = codec.key_block_bytes(), value_bytes = codec.value_record_bytes();
  std::vector<float> block(static_cast<size_t>(g * d));
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / hkv, h = row % hkv, length = load_index(c.lengths, b);
    const auto ring = [&](const Tensor& t, int64_t token) {
      return t.ptr<float>() + ((b * window + token % window) * hkv + h) * d;
    };
    for (int64_t s = 0; s < tokens; ++s) {
      const int64_t t = length + s, from = n.offset(b, s, h);
      // f16 and bf16 widen to f32 exactly: the ring holds the values as stored.
      float* k = ring(c.recent_k, t);
      float* v = ring(c.recent_v, t);
      for (int64_t j = 0; j < d; ++j) {
        k[j] = float(load(a.k_new, from + j));
        v[j] = float(load(a.v_new, from + j));
      }
      // From t to t + 1 tokens, KiviCache's counts grow by at most one value and one key block.
      const int64_t values_before = detail::kivi_quantized_values(t, residual);
      if (detail::kivi_quantized_values(t + 1, residual) > values_before) {
        const int64_t slot = paged_slot(c.page_table, page_size, b, values_before);
        codec.encode_value({ring(c.recent_v, values_before), size_t(d)},
                           {c.v_pages.ptr<uint8_t>() + (slot * hkv + h) * value_bytes, size_t(value_bytes)});
      }
      const int64_t keys_before = detail::kivi_quantized_keys(t, g, residual);
      if (detail::kivi_quantized_keys(t + 1, g, residual) > keys_before) {
        for (int64_t i = 0; i < g; ++i) std::copy_n(ring(c.recent_k, keys_before + i), d, block.begin() + i * d);
        const int64_t slot = paged_slot(c.page_table, page_size, b, keys_before);
        codec.encode_keys(block, {c.k_pages.ptr<uint8_t>() + (slot / g * hkv + h) * key_bytes, size_t(key_bytes)});
      }
    }
  }
}

int64_t kivi_append_row_count(const KiviAppendPagedArgs& a) {
  const NewTokens n(a.k_new);
  return n.batch * n.heads;
}

void kivi_append_paged(const KiviAppendPagedArgs& a) { kivi_append_rows(a, 0, kivi_append_row_count(a)); }

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
