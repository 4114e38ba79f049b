// Verification cases for the paged QJL-key / TurboQuant-value cache (qjl_cache.h): the append
// (codes bit-exact against the reference encoders), one new token per sequence and several apart,
// and fused decode attention against the reference, which scores every key with QjlKeys::score
// (S q and the signed sums in double), decodes every value and attends in double. Attention is
// single-token decode: one query per sequence, at lengths 1, 17, lengths that are not page multiples and about 2000;
// sketches of m = 16 (the smallest the cpu kernel takes), 48 (not a power of 2, below D), 64 (the
// smallest the cuda kernel takes), 128, 256 and 512 (above D); values at 2, 3 and 4 bits; head_dim 64, 96, 128, 256; GQA 1, 4, 6, 8; pages of
// 16, 32, 64 and 128; the dense value rotation once.
#include <fmt/format.h>

#include <memory>

#include "decodelab/qjl_cache.h"
#include "verify/harness.h"
#include "verify/random.h"
#include "verify/record_cache_fixture.h"

namespace decodelab::verify {
namespace {

using kvquant::QjlConfig;
using kvquant::QjlKeys;
using kvquant::RotationKind;
using kvquant::ScaleMode;
using kvquant::TurboQuantConfig;
using kvquant::TurboQuantMse;
using Codecs = LazyCodecs<QjlKeys, TurboQuantMse>;

struct Shape {
  std::vector<int32_t> lengths;
  int64_t hq, hkv, d, page_size, m;
  int v_bits;
  RotationKind v_rotation = RotationKind::hadamard;
  double q_scale = 1.0;  // > 1: large logits

  QjlConfig k_config() const { return {d, m, 31}; }
  TurboQuantConfig v_config() const { return {d, v_bits, v_rotation, 32, ScaleMode::norm_corrected}; }
  std::string name() const {
    // hq = 0 for an append, which has no queries.
    return fmt::format("{}Hkv={} D={} lengths [{}] page {} K QJL m={} V {}-bit {}{}",
                       hq > 0 ? fmt::format("Hq={} ", hq) : "", hkv, d, fmt::join(lengths, ", "), page_size, m, v_bits,
                       kvquant::rotation_kind_name(v_rotation), q_scale > 1.0 ? " large-logits" : "");
  }
};

const Shape kAttention[] = {
    {{1, 17}, 8, 2, 128, 16, 256, 4},                        // length 1 and 17, GQA 4
    {{1}, 4, 4, 64, 16, 16, 2},                              // one token, MHA, the smallest sketch
    {{45, 130}, 8, 8, 64, 32, 128, 2},                       // MHA, D = 64, pages of 32
    {{100, 33}, 12, 2, 96, 64, 48, 4},                       // GQA 6, D = 96, m below D, pages of 64
    {{100, 33}, 12, 2, 96, 16, 256, 2},
    {{2001}, 32, 4, 128, 128, 256, 2},                       // GQA 8, thousands
    {{200, 1}, 4, 1, 256, 128, 512, 4, RotationKind::dense},  // D = 256, MQA, m above D, dense
    {{64, 300}, 32, 8, 128, 16, 128, 4, RotationKind::hadamard, 4.0},  // Llama-3-8B heads, large logits
    {{33, 200}, 8, 2, 128, 32, 64, 3},                       // m = 64 (cuda's smallest), 3-bit values
    {{70}, 12, 2, 96, 16, 512, 2},                           // D = 96 with m = 512: parts of 48 rows
};

// Appends: a new token at a page's last slot, at a page start and at length 0; several new tokens
// that fill a page and run into the next, or span pages; the smallest sketch, sketches below and
// above D.
struct AppendShape {
  Shape s;
  int64_t tokens;
};

const AppendShape kAppend[] = {
    {{{15, 16, 0}, 0, 2, 128, 16, 256, 2}, 1},
    {{{127, 5}, 0, 6, 96, 128, 48, 4, RotationKind::dense}, 1},
    {{{40}, 0, 1, 256, 16, 512, 4}, 1},
    {{{0, 9}, 0, 2, 128, 16, 128, 4}, 16},
    {{{30, 1}, 0, 4, 64, 16, 16, 2}, 37},
    {{{3}, 0, 8, 128, 128, 256, 3}, 200},
};

}  // namespace

void add_qjl_cases(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  add_record_attention_cases<QjlDecodeAttentionPagedArgs, PagedQjlKV, Codecs>(grid, filter, kAttention);
  for (const auto& [s, tokens] : kAppend) {
    add_record_append_cases<QjlAppendPagedArgs, PagedQjlKV, Codecs>(grid, filter, s, tokens,
                                                                    "QjlKeys::encode and TurboQuantMse::encode");
  }
}

}  // namespace decodelab::verify
