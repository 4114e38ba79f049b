// Argument checks that the ops over paged caches of per-token records share (turboquant_cache.cpp,
// rabitq_cache.cpp): the TurboQuant codec, a record pool, and the [B, H, D] activations.
#pragma once

#include <fmt/format.h>

#include <string>

#include "decodelab/kvquant.h"
#include "ops/common.h"

namespace decodelab::detail {

// A codec is given and is for the head_dim of the tokens it will see (a codebook for another D
// would quantize on the wrong scale; a record of another D has another length).
inline const kvquant::TurboQuantMse& check_turboquant_codec(const ArgCheck& c, const kvquant::TurboQuantMse* codec,
                                                            const char* name, int64_t d, const char* d_of) {
  if (codec == nullptr) c.fail(name, "a TurboQuantMse codec", "null");
  if (codec->config().head_dim != d) {
    c.fail(name, fmt::format("a codec for head_dim D = {} (of {})", d, d_of),
           fmt::format("a codec for D = {}", codec->config().head_dim));
  }
  // Every backend's kernels, the reference's included, expand one width of codes from
  // config().bits; a split record would be read at the wrong offsets, so it is refused here once.
  if (codec->config().high_bits_channels != 0) {
    c.fail(name, "a codec of one integer width (the fused kernels do not implement split widths)",
           fmt::format("a split {:g}-bit codec (high_bits_channels = {})", codec->config().bits_per_coordinate(),
                       codec->config().high_bits_channels));
  }
  return *codec;
}

// One pool: u8 [num_pages, page_size, Hkv, R], R the record bytes of its codec (`bits`, `d`), so
// a pool written at other bits (or for another D) is refused by its record length.
inline void check_record_pool(const ArgCheck& c, const Tensor& pool, const char* name, int64_t record_bytes, int bits,
                              int64_t d, const char* codec_name, int64_t num_pages, int64_t page_size, int64_t hkv,
                              Device device) {
  const std::string layout = fmt::format("[num_pages, page_size, Hkv, R]: R = {} bytes, a {}-bit record of D = {} ({})",
                                         record_bytes, bits, d, codec_name);
  c.shape(pool, name, {num_pages, page_size, hkv, record_bytes}, layout);
  c.dtype(pool, name, DType::u8);
  c.usable(pool, name, device);
}

// x = [B, H, D] in an activation dtype; its device is the call's (the codecs stay host objects).
inline void check_heads(const ArgCheck& c, const Tensor& x, const char* name, const char* layout) {
  c.shape(x, name, {kAny, kAny, kAny}, layout);
  c.activation(x, name);
  c.usable(x, name, x.device);
  if (x.dim(0) < 1 || x.dim(1) < 1) c.fail(name, "B >= 1 and at least one head", x.describe());
  c.head_dim(x.dim(2), name);
}

}  // namespace decodelab::detail
