// Argument checks that the ops over paged caches of per-token records share (turboquant_cache.cpp,
// rabitq_cache.cpp, qjl_cache.cpp, and kivi_cache.cpp for the new tokens): the TurboQuant codec,
// a record pool, the whole record cache, the [B, H, D] activations, the query side of decode
// attention, the new tokens of an append, and the whole of decode attention over a cache of key
// records and TurboQuant values.
#pragma once

#include <fmt/format.h>

#include <array>
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
  // The fused cpu kernels expand a split width's two runs of indices 16 at a time (the CUDA
  // attention takes a multiple of 32 only, said in its supports()).
  if (codec->config().high_bits_channels % 16 != 0) {
    c.fail(name, "an integer width or a split one with high_bits_channels a multiple of 16 (the fused kernels expand 16 indices at a time)",
           fmt::format("a split {:g}-bit codec (high_bits_channels = {})", codec->config().bits_per_coordinate(),
                       codec->config().high_bits_channels));
  }
  return *codec;
}

// The records of a codec of `bits`-bit coordinates for head_dim D, as check_record_pool names them.
inline std::string coordinate_records(int bits, int64_t d) { return fmt::format("a {}-bit record of D = {}", bits, d); }

// One pool: u8 [num_pages, page_size, Hkv, R], R the record bytes of its codec, so a pool written
// at other bits (or for another D) is refused by its record length. `record` says what a record
// holds ("a 4-bit record of D = 128": coordinate_records).
inline void check_record_pool(const ArgCheck& c, const Tensor& pool, const char* name, int64_t record_bytes,
                              std::string_view record, const char* codec_name, int64_t num_pages, int64_t page_size,
                              int64_t hkv, Device device) {
  const std::string layout =
      fmt::format("[num_pages, page_size, Hkv, R]: R = {} bytes, {} ({})", record_bytes, record, codec_name);
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

// What the pools of a cache need of its key codec: its records' length and what they hold, as
// check_record_pool names them.
struct KeyRecords {
  int64_t bytes;
  std::string what;
};

// The pools and page table of a record cache (PagedTurboQuantKV, PagedRecordKV) against B
// sequences of Hkv heads of dimension D (of `d_of`), on `device`, its key codec checked by the
// caller (`keys` its records); with check_values, every lengths[b] + extra fits the page table and
// every page it covers is a page of the pools.
template <class Cache>
void check_record_cache(const ArgCheck& c, const Cache& cache, const KeyRecords& keys, int64_t batch, int64_t hkv,
                        int64_t d, const char* d_of, Device device, int64_t extra, int64_t min_length,
                        bool check_values) {
  const kvquant::TurboQuantMse& v_codec = check_turboquant_codec(c, cache.v_codec, "cache.v_codec", d, d_of);
  if (cache.k_pages.rank != 4) c.fail("cache.k_pages", "rank 4 [num_pages, page_size, Hkv, R]", cache.k_pages.describe());
  const int64_t num_pages = cache.k_pages.dim(0), page_size = cache.k_pages.dim(1);
  if (page_size < 1) c.fail("cache.k_pages", "page_size >= 1", cache.k_pages.describe());
  check_record_pool(c, cache.k_pages, "cache.k_pages", keys.bytes, keys.what, "cache.k_codec", kAny, kAny, hkv, device);
  check_record_pool(c, cache.v_pages, "cache.v_pages", v_codec.record_bytes(),
                    coordinate_records(v_codec.config().bits, d), "cache.v_codec", num_pages, page_size, hkv, device);
  check_page_table(c, cache.page_table, cache.lengths, batch, num_pages, page_size, device, extra, min_length,
                   check_values);
}

// The whole of a cache of `key_kind` key records (rabitq_cache.h, qjl_cache.h: RabitqKeys, QjlKeys,
// with config().head_dim and record_bytes()) and TurboQuant value records, as check_record_cache:
// the key codec is given and is for D (one for another D reads records of another length, on
// another rotation or sketch); key_records(codec) checks whatever else the kernels need of it and
// says its records.
template <class Cache, class KeyRecordsOf>
void check_keyed_record_cache(const ArgCheck& c, const Cache& cache, const char* key_kind,
                              const KeyRecordsOf& key_records, int64_t batch, int64_t hkv, int64_t d, const char* d_of,
                              Device device, int64_t extra, int64_t min_length, bool check_values) {
  if (cache.k_codec == nullptr) c.fail("cache.k_codec", fmt::format("a {} codec", key_kind), "null");
  if (cache.k_codec->config().head_dim != d) {
    c.fail("cache.k_codec", fmt::format("a codec for head_dim D = {} (of {})", d, d_of),
           fmt::format("a codec for D = {}", cache.k_codec->config().head_dim));
  }
  check_record_cache(c, cache, key_records(*cache.k_codec), batch, hkv, d, d_of, device, extra, min_length,
                     check_values);
}

// The query side of decode attention over a paged record cache: q, out = [B, Hq, D], k_pages of
// rank 4 and Hq a multiple of its Hkv. Returns the options with the scale resolved.
template <class Cache>
AttentionOptions check_attention_query(const ArgCheck& c, const Tensor& q, const Cache& cache, const Tensor& out,
                                       const AttentionOptions& options) {
  check_heads(c, q, "q", "[B, Hq, D]");
  c.same_shape(out, "out", q, "q");
  c.same_dtype(out, "out", q.dtype, "the dtype of q");
  c.usable(out, "out", q.device);
  const AttentionOptions resolved = resolve_attention_options(c, options, q.dim(2));
  if (cache.k_pages.rank != 4) c.fail("cache.k_pages", "rank 4 [num_pages, page_size, Hkv, R]", cache.k_pages.describe());
  c.gqa(q.dim(1), cache.k_pages.dim(2));
  return resolved;
}

// Decode attention over a paged cache of `key_kind` key records and TurboQuant value records:
// check_attention_query, then the whole cache (check_keyed_record_cache) for the queries' D with
// lengths[b] >= 1 (a softmax over no token has no value). Returns the options with the scale
// resolved.
template <class Cache, class KeyRecordsOf>
AttentionOptions check_record_attention(const ArgCheck& c, const Tensor& q, const Cache& cache, const Tensor& out,
                                        const AttentionOptions& options, const RunOptions& run, const char* key_kind,
                                        const KeyRecordsOf& key_records) {
  const AttentionOptions resolved = check_attention_query(c, q, cache, out, options);
  check_keyed_record_cache(c, cache, key_kind, key_records, q.dim(0), cache.k_pages.dim(2), q.dim(2), "q", q.device,
                           0, 1, run.check_indices);
  return resolved;
}

// The new tokens of an append: k_new = [B, Hkv, D] (one token per sequence) or [B, S, Hkv, D], an
// activation dtype, on `device`; v_new the same. Returns {B, S, Hkv, D}.
inline std::array<int64_t, 4> check_new_tokens(const ArgCheck& c, const Tensor& k_new, const Tensor& v_new,
                                               Device device) {
  constexpr const char* kLayout = "[B, Hkv, D] (one new token per sequence) or [B, S, Hkv, D]";
  if (k_new.rank != 3 && k_new.rank != 4) c.fail("k_new", kLayout, k_new.describe());
  c.activation(k_new, "k_new");
  c.usable(k_new, "k_new", device);
  const int64_t batch = k_new.dim(0), tokens = k_new.rank == 4 ? k_new.dim(1) : 1;
  const int64_t hkv = k_new.dim(k_new.rank - 2), d = k_new.dim(k_new.rank - 1);
  if (batch < 1 || tokens < 1 || hkv < 1) c.fail("k_new", "B >= 1, S >= 1 and at least one head", k_new.describe());
  c.head_dim(d, "k_new");
  c.same_shape(v_new, "v_new", k_new, "k_new");
  c.same_dtype(v_new, "v_new", k_new.dtype, "the dtype of k_new");
  c.usable(v_new, "v_new", device);
  return {batch, tokens, hkv, d};
}

}  // namespace decodelab::detail
