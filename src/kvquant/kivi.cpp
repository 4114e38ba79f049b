// KIVI, the double-precision reference: Liu, Yuan, Jin, Zhong, Xu, Braverman, Chen, Hu, "KIVI: A
// Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv:2402.02750 (ICML 2024). Keys are
// quantized per channel over blocks of G tokens, values per token in groups of channels, both
// with asymmetric (min, scale) rounding; the most recent R tokens stay in full precision. The
// record layouts and the rule for which tokens are quantized are in include/decodelab/kvquant.h.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/check.h"
#include "decodelab/error.h"
#include "decodelab/kvquant.h"
#include "kvquant/record.h"

namespace decodelab::kvquant {
namespace {

const KiviConfig& checked(const KiviConfig& config) {
  const detail::ArgCheck check("kivi");
  if (config.head_dim < 1 || config.head_dim > 4096) {
    check.fail("config.head_dim", "D in [1, 4096]", std::to_string(config.head_dim));
  }
  if (config.bits < 1 || config.bits > 4) check.fail("config.bits", "1, 2, 3 or 4", std::to_string(config.bits));
  if (config.key_group < 1 || config.key_group > 4096) {
    check.fail("config.key_group", "G in [1, 4096] tokens", std::to_string(config.key_group));
  }
  if (config.value_group < 1 || config.head_dim % config.value_group != 0) {
    check.fail("config.value_group", fmt::format("a positive divisor of head_dim {}", config.head_dim),
               std::to_string(config.value_group));
  }
  if (config.residual < 0) check.fail("config.residual", "R >= 0 tokens", std::to_string(config.residual));
  return config;
}

// The (lo, scale) of one group and its codes. Keys and values differ only in which elements form
// a group: a key channel is G elements D apart, a value group value_group consecutive ones. The
// codes land at the same offsets as the elements, so one token-major code array serves both.
struct GroupView {
  size_t first = 0;   // offset of the group's first element
  size_t count = 0;   // elements in the group
  size_t stride = 1;  // distance between consecutive elements
};

void quantize_group(const detail::ArgCheck& check, std::string_view name, std::span<const float> x, GroupView group,
                    int bits, std::span<uint8_t> codes, float& lo_out, float& scale_out) {
  float lo = x[group.first], hi = lo;
  for (size_t i = 1; i < group.count; ++i) {
    const float v = x[group.first + i * group.stride];
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  const double levels = double((1 << bits) - 1);
  // Finite lo and hi can still span more than f32 holds (-3e38 to 3e38 at 1 bit).
  const double scale_wide = (double(hi) - double(lo)) / levels;
  if (!std::isfinite(float(scale_wide))) {
    check.fail(name, "groups whose range (max - min) / (2^bits - 1) fits in f32",
               fmt::format("min {:g}, max {:g} in the group at element {}", lo, hi, group.first));
  }
  // Round against the stored f32 numbers: the decoder has only those.
  const float scale = float(scale_wide);
  for (size_t i = 0; i < group.count; ++i) {
    const size_t at = group.first + i * group.stride;
    double code = 0.0;  // a constant group (scale 0) is all zeros and decodes to lo exactly
    if (scale > 0.0f) code = std::clamp(std::round((double(x[at]) - double(lo)) / double(scale)), 0.0, levels);
    codes[at] = uint8_t(code);
  }
  lo_out = lo;
  scale_out = scale;
}

void dequantize_group(std::span<const uint8_t> codes, GroupView group, float lo, float scale, std::span<float> x) {
  for (size_t i = 0; i < group.count; ++i) {
    const size_t at = group.first + i * group.stride;
    x[at] = float(double(lo) + double(codes[at]) * double(scale));
  }
}

// A record's (lo, scale) pairs, checked: no encoder writes a non-finite lo or a negative or
// non-finite scale.
void load_params(const detail::ArgCheck& check, std::span<const uint8_t> record, size_t groups, std::vector<float>& lo,
                 std::vector<float>& scale) {
  lo.resize(groups);
  scale.resize(groups);
  for (size_t g = 0; g < groups; ++g) {
    lo[g] = detail::load_f32_le(record.data() + 4 * g);
    scale[g] = detail::load_f32_le(record.data() + 4 * (groups + g));
    if (!std::isfinite(lo[g])) check.fail(fmt::format("record min[{}]", g), "a finite value", fmt::format("{}", lo[g]));
    if (!(std::isfinite(scale[g]) && scale[g] >= 0.0f)) {
      check.fail(fmt::format("record scale[{}]", g), "a finite scale >= 0", fmt::format("{}", scale[g]));
    }
  }
}

void store_params(std::span<uint8_t> record, std::span<const float> lo, std::span<const float> scale) {
  for (size_t g = 0; g < lo.size(); ++g) {
    detail::store_f32_le(record.data() + 4 * g, lo[g]);
    detail::store_f32_le(record.data() + 4 * (lo.size() + g), scale[g]);
  }
}

void check_sizes(const detail::ArgCheck& check, std::string_view x_name, size_t x_size, size_t x_want,
                 std::string_view x_what, size_t record_size, int64_t record_bytes, std::string_view record_call) {
  if (x_size != x_want) check.fail(x_name, fmt::format("{} values ({})", x_want, x_what), std::to_string(x_size));
  if (int64_t(record_size) != record_bytes) {
    check.fail("record", fmt::format("{} bytes ({})", record_bytes, record_call), fmt::format("{} bytes", record_size));
  }
}

// The groups of a key block are its D channels; of a value record, its D / value_group slices.
GroupView key_channel(const KiviConfig& c, size_t d) { return {d, size_t(c.key_group), size_t(c.head_dim)}; }
GroupView value_slice(const KiviConfig& c, size_t g) { return {g * size_t(c.value_group), size_t(c.value_group), 1}; }

// A record of x in `groups` groups (group_of(g) says which elements): the (lo, scale) pairs, then
// the codes in x's element order. Keys and values differ only in group_of.
template <class GroupOf>
void encode_groups(const detail::ArgCheck& check, std::string_view name, std::span<const float> x, size_t groups,
                   GroupOf group_of, int bits, std::span<uint8_t> record) {
  detail::check_finite(check, x, name);
  std::vector<uint8_t> codes(x.size());
  std::vector<float> lo(groups), scale(groups);
  for (size_t g = 0; g < groups; ++g) quantize_group(check, name, x, group_of(g), bits, codes, lo[g], scale[g]);
  store_params(record, lo, scale);
  pack_bits(codes, bits, record.subspan(8 * groups));
}

template <class GroupOf>
void decode_groups(const detail::ArgCheck& check, std::span<const uint8_t> record, size_t groups, GroupOf group_of,
                   int bits, std::span<float> x) {
  std::vector<float> lo, scale;
  load_params(check, record, groups, lo, scale);
  std::vector<uint8_t> codes(x.size());
  unpack_bits(record.subspan(8 * groups), bits, codes);
  for (size_t g = 0; g < groups; ++g) dequantize_group(codes, group_of(g), lo[g], scale[g], x);
}

}  // namespace

KiviCodec::KiviCodec(const KiviConfig& config) : config_(checked(config)) {}

int64_t KiviCodec::key_block_bytes() const {
  return 8 * config_.head_dim + packed_bytes(config_.key_group * config_.head_dim, config_.bits);
}

int64_t KiviCodec::value_record_bytes() const {
  return 8 * (config_.head_dim / config_.value_group) + packed_bytes(config_.head_dim, config_.bits);
}

void KiviCodec::encode_keys(std::span<const float> keys, std::span<uint8_t> record) const {
  const detail::ArgCheck check("kivi.encode_keys");
  const size_t d = size_t(config_.head_dim), n = size_t(config_.key_group) * d;
  check_sizes(check, "keys", keys.size(), n, fmt::format("key_group x head_dim = {} x {}", config_.key_group, d),
              record.size(), key_block_bytes(), "key_block_bytes()");
  encode_groups(check, "keys", keys, d, [&](size_t c) { return key_channel(config_, c); }, config_.bits, record);
}

void KiviCodec::decode_keys(std::span<const uint8_t> record, std::span<float> keys) const {
  const detail::ArgCheck check("kivi.decode_keys");
  const size_t d = size_t(config_.head_dim), n = size_t(config_.key_group) * d;
  check_sizes(check, "keys", keys.size(), n, fmt::format("key_group x head_dim = {} x {}", config_.key_group, d),
              record.size(), key_block_bytes(), "key_block_bytes()");
  decode_groups(check, record, d, [&](size_t c) { return key_channel(config_, c); }, config_.bits, keys);
}

void KiviCodec::encode_value(std::span<const float> v, std::span<uint8_t> record) const {
  const detail::ArgCheck check("kivi.encode_value");
  const size_t d = size_t(config_.head_dim), groups = d / size_t(config_.value_group);
  check_sizes(check, "v", v.size(), d, "head_dim", record.size(), value_record_bytes(), "value_record_bytes()");
  encode_groups(check, "v", v, groups, [&](size_t g) { return value_slice(config_, g); }, config_.bits, record);
}

void KiviCodec::decode_value(std::span<const uint8_t> record, std::span<float> v) const {
  const detail::ArgCheck check("kivi.decode_value");
  const size_t d = size_t(config_.head_dim), groups = d / size_t(config_.value_group);
  check_sizes(check, "v", v.size(), d, "head_dim", record.size(), value_record_bytes(), "value_record_bytes()");
  decode_groups(check, record, groups, [&](size_t g) { return value_slice(config_, g); }, config_.bits, v);
}

// ---------------------------------------------------------------------------------------------
// KiviCache

KiviCache::KiviCache(const KiviConfig& config) : codec_(config) {}

void KiviCache::append(std::span<const float> k, std::span<const float> v) {
  const detail::ArgCheck check("kivi_cache.append");
  const KiviConfig& c = codec_.config();
  const size_t d = size_t(c.head_dim);
  if (k.size() != d) check.fail("k", fmt::format("{} values (head_dim)", d), std::to_string(k.size()));
  if (v.size() != d) check.fail("v", fmt::format("{} values (head_dim)", d), std::to_string(v.size()));
  // Checked before anything is stored, so a refused token leaves the cache as it was.
  detail::check_finite(check, k, "k");
  detail::check_finite(check, v, "v");
  recent_keys_.insert(recent_keys_.end(), k.begin(), k.end());
  recent_values_.insert(recent_values_.end(), v.begin(), v.end());
  ++tokens_;

  // The oldest value leaves the window of R as soon as it holds R + 1 tokens.
  if (int64_t(recent_values_.size() / d) > c.residual) {
    const size_t at = value_records_.size();
    value_records_.resize(at + size_t(codec_.value_record_bytes()));
    codec_.encode_value(std::span<const float>(recent_values_).first(d), std::span<uint8_t>(value_records_).subspan(at));
    recent_values_.erase(recent_values_.begin(), recent_values_.begin() + ptrdiff_t(d));
  }
  // The oldest G keys have all left the window once R + G are held.
  if (int64_t(recent_keys_.size() / d) >= c.residual + c.key_group) {
    const size_t n = size_t(c.key_group) * d, at = key_blocks_.size();
    key_blocks_.resize(at + size_t(codec_.key_block_bytes()));
    codec_.encode_keys(std::span<const float>(recent_keys_).first(n), std::span<uint8_t>(key_blocks_).subspan(at));
    recent_keys_.erase(recent_keys_.begin(), recent_keys_.begin() + ptrdiff_t(n));
  }
}

int64_t KiviCache::full_precision_keys() const { return int64_t(recent_keys_.size()) / codec_.config().head_dim; }
int64_t KiviCache::quantized_keys() const { return tokens_ - full_precision_keys(); }
int64_t KiviCache::full_precision_values() const { return int64_t(recent_values_.size()) / codec_.config().head_dim; }
int64_t KiviCache::quantized_values() const { return tokens_ - full_precision_values(); }

std::vector<float> KiviCache::keys() const {
  const KiviConfig& c = codec_.config();
  const size_t block = size_t(codec_.key_block_bytes()), n = size_t(c.key_group * c.head_dim);
  std::vector<float> out(size_t(tokens_ * c.head_dim));
  for (size_t b = 0; b * block < key_blocks_.size(); ++b) {
    codec_.decode_keys(std::span<const uint8_t>(key_blocks_).subspan(b * block, block), std::span<float>(out).subspan(b * n, n));
  }
  std::copy(recent_keys_.begin(), recent_keys_.end(), out.end() - ptrdiff_t(recent_keys_.size()));
  return out;
}

std::vector<float> KiviCache::values() const {
  const size_t bytes = size_t(codec_.value_record_bytes()), d = size_t(codec_.config().head_dim);
  std::vector<float> out(size_t(tokens_) * d);
  for (size_t t = 0; t * bytes < value_records_.size(); ++t) {
    codec_.decode_value(std::span<const uint8_t>(value_records_).subspan(t * bytes, bytes), std::span<float>(out).subspan(t * d, d));
  }
  std::copy(recent_values_.begin(), recent_values_.end(), out.end() - ptrdiff_t(recent_values_.size()));
  return out;
}

}  // namespace decodelab::kvquant
