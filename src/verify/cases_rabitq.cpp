// Verification cases for the paged RaBitQ-key / TurboQuant-value cache (rabitq_cache.h): the
// append (codes bit-exact against the reference encoders), one new token per sequence and several
// apart, and fused decode attention against the reference, which scores every key with
// RabitqKeys::estimate, decodes every value and attends in double. Attention is single-token
// decode: one query per sequence, at
// lengths 1, 17, lengths that are not page multiples and about 2000; RaBitQ at 1 bit and extended
// RaBitQ at 2, 3 and 4 bits; values at 2, 3 and 4 bits; head_dim 64, 96, 128, 256; GQA 1, 4, 6, 8;
// pages of 16, 32 and 128; a key centroid (whose term the fused kernels drop: the softmax does not see
// it) and the dense rotation once each.
#include <fmt/format.h>

#include <cmath>
#include <memory>

#include "decodelab/rabitq_cache.h"
#include "verify/harness.h"
#include "verify/random.h"
#include "verify/record_cache_fixture.h"

namespace decodelab::verify {
namespace {

using kvquant::RabitqConfig;
using kvquant::RabitqKeys;
using kvquant::RotationKind;
using kvquant::ScaleMode;
using kvquant::TurboQuantConfig;
using kvquant::TurboQuantMse;
using Codecs = LazyCodecs<RabitqKeys, TurboQuantMse>;

struct Shape {
  std::vector<int32_t> lengths;
  int64_t hq, hkv, d, page_size;
  int k_bits, v_bits;
  RotationKind rotation = RotationKind::hadamard;
  bool centroid = false;  // a key centroid c_j = sin(j)
  double q_scale = 1.0;   // > 1: large logits

  RabitqConfig k_config() const {
    RabitqConfig c{d, k_bits, 4, rotation, 21, {}};
    for (int64_t j = 0; centroid && j < d; ++j) c.centroid.push_back(float(std::sin(double(j))));
    return c;
  }
  TurboQuantConfig v_config() const { return {d, v_bits, rotation, 22, ScaleMode::norm_corrected}; }
  std::string name() const {
    // hq = 0 for an append, which has no queries.
    return fmt::format("{}Hkv={} D={} lengths [{}] page {} K RaBitQ {}-bit V {}-bit {}{}{}",
                       hq > 0 ? fmt::format("Hq={} ", hq) : "", hkv, d, fmt::join(lengths, ", "), page_size, k_bits,
                       v_bits, kvquant::rotation_kind_name(rotation), centroid ? " centroid" : "",
                       q_scale > 1.0 ? " large-logits" : "");
  }
};

const Shape kAttention[] = {
    {{1, 17}, 8, 2, 128, 16, 1, 4},                              // length 1 and 17, GQA 4
    {{1, 17}, 8, 2, 128, 16, 4, 2},
    {{45, 130}, 8, 8, 64, 16, 1, 2},                             // MHA, D = 64
    {{45, 130}, 8, 8, 64, 16, 4, 4},
    {{100, 33}, 12, 2, 96, 16, 1, 4},                            // GQA 6, D = 96
    {{100, 33}, 12, 2, 96, 16, 4, 2},
    {{2001}, 32, 4, 128, 128, 1, 2},                             // GQA 8, thousands
    {{2001}, 32, 4, 128, 128, 4, 4},
    {{200, 1}, 4, 1, 256, 128, 1, 4, RotationKind::dense},       // D = 256, MQA, dense rotation
    {{200, 1}, 4, 1, 256, 128, 4, 2},
    {{77}, 8, 2, 128, 16, 2, 2},                                 // extended RaBitQ at 2 bits
    {{90, 40}, 12, 2, 96, 32, 3, 3},                             // 3-bit keys and values, GQA 6, D = 96
    {{150}, 8, 2, 128, 16, 4, 4, RotationKind::hadamard, true},  // a centroid
    {{64, 300}, 32, 8, 128, 16, 1, 4, RotationKind::hadamard, false, 4.0},  // Llama-3-8B heads, large logits
};

// Appends: a new token at a page's last slot, at a page start and at length 0; several new tokens
// that fill a page and run into the next, or span pages.
struct AppendShape {
  Shape s;
  int64_t tokens;
};

const AppendShape kAppend[] = {
    {{{15, 16, 0}, 0, 2, 128, 16, 1, 2}, 1},
    {{{127, 5}, 0, 6, 96, 128, 4, 4, RotationKind::dense}, 1},
    {{{40}, 0, 1, 256, 16, 2, 4, RotationKind::hadamard, true}, 1},  // a centroid
    {{{0, 9}, 0, 2, 128, 16, 1, 4}, 16},
    {{{30, 1}, 0, 4, 64, 16, 4, 2}, 37},
    {{{3}, 0, 8, 128, 128, 2, 3}, 200},
};

void add_append(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const auto& [s, tokens] : kAppend) {
    add_record_append_cases<RabitqAppendPagedArgs, PagedRabitqKV, Codecs>(
        grid, filter, s, tokens, "RabitqKeys::encode and TurboQuantMse::encode");
  }
}

}  // namespace

void add_rabitq_cases(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  add_record_attention_cases<RabitqDecodeAttentionPagedArgs, PagedRabitqKV, Codecs>(grid, filter, kAttention);
  add_append(grid, filter);
}

}  // namespace decodelab::verify
