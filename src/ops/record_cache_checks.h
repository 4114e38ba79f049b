// Argument checks that the ops over paged caches of per-token records share (turboquant_cache.cpp,
// rabitq_cache.cpp, qjl_cache.cpp): the TurboQuant codec, a record pool, the [B, H, D]
// activations, and the whole of decode attention over a cache of key records and TurboQuant values.
#pragma once

#include <fmt/format.h>

#include <string>
#include <string_view>

#include "decodelab/kvquant.h"
#include "decodelab/router.h"
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
// `record` says what a record holds ("a 4-bit record of D = 128").
inline void check_record_pool(const ArgCheck& c, const Tensor& pool, const char* name, int64_t record_bytes,
                              std::string_view record, const char* codec_name, int64_t num_pages, int64_t page_size,
                              int64_t hkv, Device device) {
  const std::string layout =
      fmt::format("[num_pages, page_size, Hkv, R]: R = {} bytes, {} ({})", record_bytes, record, codec_name);
  c.shape(pool, name, {num_pages, page_size, hkv, record_bytes}, layout);
  c.dtype(pool, name, DType::u8);
  c.usable(pool, name, device);
}

inline void check_record_pool(const ArgCheck& c, const Tensor& pool, const char* name, int64_t record_bytes, int bits,
                              int64_t d, const char* codec_name, int64_t num_pages, int64_t page_size, int64_t hkv,
                              Device device) {
  check_record_pool(c, pool, name, record_bytes, fmt::format("a {}-bit record of D = {}", bits, d), codec_name,
                    num_pages, page_size, hkv, device);
}

// x = [B, H, D] in an activation dtype; its device is the call's (the codecs stay host objects).
inline void check_heads(const ArgCheck& c, const Tensor& x, const char* name, const char* layout) {
  c.shape(x, name, {kAny, kAny, kAny}, layout);
  c.activation(x, name);
  c.usable(x, name, x.device);
  if (x.dim(0) < 1 || x.dim(1) < 1) c.fail(name, "B >= 1 and at least one head", x.describe());
  c.head_dim(x.dim(2), name);
}

// What an op over key records needs of its key codec: its records' length and what they hold,
// as check_record_pool names them.
struct KeyRecords {
  int64_t bytes;
  std::string what;
};

// Decode attention over a paged cache (rabitq_cache.h, qjl_cache.h) of key records of `key_kind`
// codecs (RabitqKeys, QjlKeys: config().head_dim, record_bytes()) and TurboQuant value records:
// q, out = [B, Hq, D]; the codecs for D; pools [num_pages, page_size, Hkv, R] of their record
// lengths; the page table and lengths[b] >= 1 (a softmax over no token has no value).
// key_records(codec) checks whatever else the kernels need of the key codec and says its records.
// Returns the options with the scale resolved.
template <class Cache, class KeyRecordsOf>
AttentionOptions check_record_attention(const ArgCheck& c, const Tensor& q, const Cache& cache, const Tensor& out,
                                        const AttentionOptions& options, const RunOptions& run, const char* key_kind,
                                        const KeyRecordsOf& key_records) {
  check_heads(c, q, "q", "[B, Hq, D]");
  c.same_shape(out, "out", q, "q");
  c.same_dtype(out, "out", q.dtype, "the dtype of q");
  c.usable(out, "out", q.device);
  const AttentionOptions resolved = resolve_attention_options(c, options, q.dim(2));
  const int64_t d = q.dim(2);
  // A key codec for another D reads records of another length, on another rotation or sketch.
  if (cache.k_codec == nullptr) c.fail("cache.k_codec", fmt::format("a {} codec", key_kind), "null");
  if (cache.k_codec->config().head_dim != d) {
    c.fail("cache.k_codec", fmt::format("a codec for head_dim D = {} (of q)", d),
           fmt::format("a codec for D = {}", cache.k_codec->config().head_dim));
  }
  const KeyRecords keys = key_records(*cache.k_codec);
  const kvquant::TurboQuantMse& v_codec = check_turboquant_codec(c, cache.v_codec, "cache.v_codec", d, "q");
  if (cache.k_pages.rank != 4) c.fail("cache.k_pages", "rank 4 [num_pages, page_size, Hkv, R]", cache.k_pages.describe());
  const int64_t num_pages = cache.k_pages.dim(0), page_size = cache.k_pages.dim(1), hkv = cache.k_pages.dim(2);
  if (page_size < 1) c.fail("cache.k_pages", "page_size >= 1", cache.k_pages.describe());
  c.gqa(q.dim(1), hkv);
  check_record_pool(c, cache.k_pages, "cache.k_pages", keys.bytes, keys.what, "cache.k_codec", kAny, kAny, hkv,
                    q.device);
  check_record_pool(c, cache.v_pages, "cache.v_pages", v_codec.record_bytes(), v_codec.config().bits, d,
                    "cache.v_codec", num_pages, page_size, hkv, q.device);
  check_page_table(c, cache.page_table, cache.lengths, q.dim(0), num_pages, page_size, q.device, 0, 1,
                   run.check_indices);
  return resolved;
}

}  // namespace decodelab::detail
