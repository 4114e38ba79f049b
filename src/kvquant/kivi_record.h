// The checks on the (lo, scale) pairs at the head of a KIVI record (kvquant.h) that the paged KIVI
// cache's kernels run where they read one (kivi_cache.h), and the errors that say where the
// corrupt record is. Internal.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include "kvquant/record.h"

namespace decodelab::detail {

// KiviCache's rule (kvquant.h): of T tokens, the keys below the returned count are in key blocks,
// and the values below quantized_values.
inline int64_t kivi_quantized_keys(int64_t tokens, int64_t key_group, int64_t residual) {
  return std::max<int64_t>(tokens - residual, 0) / key_group * key_group;
}
inline int64_t kivi_quantized_values(int64_t tokens, int64_t residual) { return std::max<int64_t>(tokens - residual, 0); }

// No KIVI encoder writes a non-finite lo or a negative or non-finite scale.
inline bool is_valid_kivi_pair(float lo, float scale) {
  return std::isfinite(lo) && std::isfinite(scale) && scale >= 0.0f;
}

// The `groups` (lo, scale) pairs of `record` (lo of group g at 4g, its scale at 4 (groups + g)),
// or an error naming `where` and the first bad pair: "<where> scale[3]: expected ...".
inline void check_kivi_pairs(const ArgCheck& check, const uint8_t* record, int64_t groups, std::string_view where) {
  for (int64_t g = 0; g < groups; ++g) {
    const float lo = load_f32_le(record + 4 * g), scale = load_f32_le(record + 4 * (groups + g));
    if (!std::isfinite(lo)) check.fail(fmt::format("{} lo[{}]", where, g), "a finite value", fmt::format("{}", lo));
    if (!is_valid_kivi_pair(lo, scale)) {
      check.fail(fmt::format("{} scale[{}]", where, g), "a finite scale >= 0", fmt::format("{}", scale));
    }
  }
}

// Where a key block or a value record of a paged KIVI cache is, for check_kivi_pairs.
inline std::string kivi_key_block_name(int64_t b, int64_t first_token, int64_t key_group, int64_t h) {
  return fmt::format("cache.k_pages[sequence {}, tokens {}..{}, KV head {}]", b, first_token,
                     first_token + key_group - 1, h);
}
inline std::string kivi_value_record_name(int64_t b, int64_t t, int64_t h) {
  return fmt::format("cache.v_pages[sequence {}, token {}, KV head {}]", b, t, h);
}

}  // namespace decodelab::detail
