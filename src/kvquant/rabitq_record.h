// Pieces of RaBitQ's key record (kvquant.h) that the codec and the paged cache's kernels share:
// where the correction and the code planes are, and the checks on the correction.
// Internal to src.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <string_view>

#include "core/check.h"
#include "kvquant/record.h"

namespace decodelab::detail {

// The record: norm, correction, then the code planes.
inline constexpr int64_t kRabitqCorrectionOffset = kNormBytes;
inline constexpr int64_t kRabitqPlanesOffset = kNormBytes + 4;

// No encoder writes a correction <o_bar, o> outside (0, 1] (NaN included), so a record holding
// one is corrupt.
inline bool is_valid_rabitq_correction(float correction) { return correction > 0.0f && correction <= 1.0f; }

// `name` says which record ("record correction", "records[3] correction").
[[noreturn]] inline void fail_rabitq_correction(const ArgCheck& check, std::string_view name, float correction) {
  check.fail(name, "a correction <o_bar, o> in (0, 1]", fmt::format("{}", correction));
}

// The key record of token t of sequence b, KV head h of a paged RaBitQ cache (rabitq_cache.h):
// its norm, then its correction, checked; the error says where the record is.
inline void check_paged_rabitq_record(const ArgCheck& check, const uint8_t* record, std::string_view pool, int64_t b,
                                      int64_t t, int64_t h) {
  const float norm = load_f32_le(record);
  if (!is_valid_norm(norm)) fail_paged_record_norm(check, pool, b, t, h, norm);
  const float correction = load_f32_le(record + kRabitqCorrectionOffset);
  if (!is_valid_rabitq_correction(correction)) {
    fail_rabitq_correction(check, fmt::format("{}[sequence {}, token {}, KV head {}] correction", pool, b, t, h),
                           correction);
  }
}

}  // namespace decodelab::detail
