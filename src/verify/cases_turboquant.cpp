// Verification cases for the paged TurboQuant cache: the append (codes bit-exact against the
// reference encoder) and fused decode attention (against the reference, which decodes every
// record and attends in double). Single-token decode only: one query per sequence, at lengths 1,
// 17, lengths that are not page multiples and a few thousand; head_dim 64, 96, 128, 256; GQA 1,
// 4, 6, 8; pages of 16 and 128; K and V at their own bits (split widths too) and scale modes.
#include <fmt/format.h>

#include <memory>

#include "decodelab/turboquant_cache.h"
#include "verify/harness.h"
#include "verify/random.h"
#include "verify/record_cache_fixture.h"

namespace decodelab::verify {
namespace {

using kvquant::RotationKind;
using kvquant::ScaleMode;
using kvquant::TurboQuantConfig;
using kvquant::TurboQuantMse;

using Codecs = LazyCodecs<TurboQuantMse, TurboQuantMse>;

struct Shape {
  std::vector<int32_t> lengths;
  int64_t hq, hkv, d, page_size;
  int k_bits, v_bits;
  ScaleMode k_scale, v_scale;
  RotationKind rotation = RotationKind::hadamard;
  double q_scale = 1.0;  // > 1: large logits
  int64_t k_high = 0, v_high = 0;  // high_bits_channels: a split (fractional) width where > 0

  TurboQuantConfig k_config() const { return {d, k_bits, rotation, 11, k_scale, k_high}; }
  TurboQuantConfig v_config() const { return {d, v_bits, rotation, 12, v_scale, v_high}; }
  std::string name() const {
    return fmt::format("Hq={} Hkv={} D={} lengths [{}] page {} K {:g}-bit {} V {:g}-bit {} {}{}", hq, hkv, d,
                       fmt::join(lengths, ", "), page_size, k_config().bits_per_coordinate(),
                       kvquant::scale_mode_name(k_scale), v_config().bits_per_coordinate(),
                       kvquant::scale_mode_name(v_scale), kvquant::rotation_kind_name(rotation),
                       q_scale > 1.0 ? " large-logits" : "");
  }
};

const Shape kAttention[] = {
    {{1, 17}, 8, 2, 128, 16, 4, 4, ScaleMode::plain, ScaleMode::plain},                   // length 1 and 17, GQA 4
    {{45, 130}, 8, 8, 64, 16, 2, 3, ScaleMode::plain, ScaleMode::norm_corrected},         // MHA, D = 64
    {{100}, 12, 2, 96, 16, 3, 2, ScaleMode::norm_corrected, ScaleMode::plain},            // GQA 6, D = 96
    {{3001}, 32, 4, 128, 128, 4, 2, ScaleMode::norm_corrected, ScaleMode::norm_corrected},  // GQA 8, thousands
    {{200, 1}, 4, 1, 256, 128, 2, 4, ScaleMode::plain, ScaleMode::norm_corrected, RotationKind::dense},  // D = 256
    {{64}, 32, 8, 128, 16, 3, 3, ScaleMode::plain, ScaleMode::plain, RotationKind::hadamard, 4.0},  // Llama-3-8B heads
    {{33}, 8, 2, 128, 16, 2, 3, ScaleMode::unbiased, ScaleMode::unbiased},  // records holding the unbiased scale
    // 4-bit K and V, the tensor-core kernel's set (cuda.mma), over the same spread of shapes.
    {{45, 130}, 8, 8, 64, 16, 4, 4, ScaleMode::plain, ScaleMode::norm_corrected},          // MHA, D = 64
    {{1500}, 32, 4, 128, 128, 4, 4, ScaleMode::norm_corrected, ScaleMode::norm_corrected},  // GQA 8, many tiles
    {{100, 7}, 12, 2, 128, 16, 4, 4, ScaleMode::norm_corrected, ScaleMode::plain, RotationKind::dense},  // GQA 6
    {{200, 1}, 4, 1, 256, 128, 4, 4, ScaleMode::plain, ScaleMode::plain, RotationKind::dense},  // D = 256
    {{64}, 32, 8, 128, 16, 4, 4, ScaleMode::plain, ScaleMode::plain, RotationKind::hadamard, 4.0},
    {{50}, 16, 1, 128, 16, 4, 4, ScaleMode::plain, ScaleMode::plain},     // GQA 16: two chunks of heads
    {{33}, 8, 2, 128, 16, 4, 4, ScaleMode::unbiased, ScaleMode::unbiased},
    // Split (fractional) widths: 2.5 and 3.5 bits at D = 128, 1.5 and 2.33 at D = 96, one token.
    {{45, 130}, 8, 2, 128, 16, 2, 3, ScaleMode::plain, ScaleMode::norm_corrected, RotationKind::hadamard, 1.0, 64, 64},
    {{100}, 12, 2, 96, 16, 1, 2, ScaleMode::norm_corrected, ScaleMode::plain, RotationKind::hadamard, 1.0, 48, 32},
    {{1}, 8, 8, 64, 16, 3, 2, ScaleMode::plain, ScaleMode::plain, RotationKind::dense, 1.0, 16, 48},
    // Splits at multiples of 32 (the cuda kernel's): 3.5 / 2.75 bits over thousands, 2.5 / 3.125 at
    // D = 256, 2.33 / 3.67 at D = 96.
    {{3001}, 32, 4, 128, 128, 3, 2, ScaleMode::norm_corrected, ScaleMode::norm_corrected, RotationKind::hadamard, 1.0, 64, 96},
    {{200, 1}, 4, 1, 256, 128, 2, 3, ScaleMode::plain, ScaleMode::norm_corrected, RotationKind::dense, 1.0, 128, 32},
    {{100, 33}, 12, 2, 96, 16, 2, 3, ScaleMode::norm_corrected, ScaleMode::plain, RotationKind::hadamard, 1.0, 32, 64},
};

// Appends: the new token at a page's last slot, at a page start, and at length 0; split widths,
// the unbiased scale with a split.
const Shape kAppend[] = {
    {{15, 16, 0}, 4, 2, 128, 16, 4, 2, ScaleMode::plain, ScaleMode::norm_corrected},
    {{127, 5}, 6, 6, 96, 128, 3, 3, ScaleMode::norm_corrected, ScaleMode::plain},
    {{40}, 8, 1, 256, 16, 2, 4, ScaleMode::plain, ScaleMode::plain, RotationKind::dense},
    {{9}, 4, 2, 128, 16, 3, 2, ScaleMode::unbiased, ScaleMode::norm_corrected},
    {{15, 16, 0}, 4, 2, 128, 16, 2, 3, ScaleMode::plain, ScaleMode::norm_corrected, RotationKind::hadamard, 1.0, 64, 64},
    {{33, 0}, 4, 2, 128, 16, 3, 2, ScaleMode::unbiased, ScaleMode::unbiased, RotationKind::hadamard, 1.0, 32, 64},
    {{7}, 6, 2, 96, 16, 2, 1, ScaleMode::norm_corrected, ScaleMode::plain, RotationKind::dense, 1.0, 48, 16},
};

void add_attention(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  add_record_attention_cases<TurboQuantDecodeAttentionPagedArgs, PagedTurboQuantKV, Codecs>(grid, filter, kAttention);
}

void add_append(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const Shape& s : kAppend) {
    add_record_append_cases<TurboQuantAppendPagedArgs, PagedTurboQuantKV, Codecs>(grid, filter, s, 1,
                                                                                  "TurboQuantMse::encode");
  }
}

}  // namespace

Tolerance compressed_attention_tolerance(DType t, double q_scale) {
  // Both sides read the same codes, so the codec's error is not in the comparison: what differs
  // is the f32 rounding of the (rotated, for a rotating codec) query, of the decoded vectors (the
  // reference's) and of the f32 accumulation, the same sources as f16-cache decode attention.
  Tolerance tol = rounding_tolerance(t, q_scale > 1.0 ? 10.0 : 1.0);
  tol.why = "same codes on both sides; " + tol.why;
  return tol;
}

void add_turboquant_cases(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  add_attention(grid, filter);
  add_append(grid, filter);
}

}  // namespace decodelab::verify
