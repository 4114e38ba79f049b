// Validation and routing of the paged KIVI cache ops: the append and fused decode attention
// (include/decodelab/kivi_cache.h).
#include <fmt/format.h>

#include <string>

#include "decodelab/kivi_cache.h"
#include "ops/common.h"
#include "ops/record_cache_checks.h"
#include "router/registry.h"

namespace decodelab {

using detail::ArgCheck;
using detail::kAny;

namespace {

// The codec is given and is for the queries' head_dim (its records have another length, its
// value groups other boundaries, for another D).
const kvquant::KiviCodec& check_codec(const ArgCheck& c, const kvquant::KiviCodec* codec, int64_t d,
                                      const char* d_of) {
  if (codec == nullptr) c.fail("cache.codec", "a KiviCodec", "null");
  if (codec->config().head_dim != d) {
    c.fail("cache.codec", fmt::format("a codec for head_dim D = {} (of {})", d, d_of),
           fmt::format("a codec for D = {}", codec->config().head_dim));
  }
  return *codec;
}

// The pools and the ring against B sequences of Hkv heads of dimension D (of `d_of`), on `device`;
// with check_values, every lengths[b] + extra fits the page table and every page it covers is a
// page of the pools.
void check_cache(const ArgCheck& c, const PagedKiviKV& cache, int64_t batch, int64_t hkv, int64_t d, const char* d_of,
                 Device device, int64_t extra, int64_t min_length, bool check_values) {
  const kvquant::KiviCodec& codec = check_codec(c, cache.codec, d, d_of);
  const kvquant::KiviConfig& config = codec.config();
  const int64_t g = config.key_group;
  // The page size is the value pool's: the key pool holds page_size / G blocks per page.
  if (cache.v_pages.rank != 4) c.fail("cache.v_pages", "rank 4 [num_pages, page_size, Hkv, Vb]", cache.v_pages.describe());
  const int64_t num_pages = cache.v_pages.dim(0), page_size = cache.v_pages.dim(1);
  if (page_size < 1 || page_size % g != 0) {
    c.fail("cache.v_pages", fmt::format("page_size a positive multiple of the codec's key_group G = {}", g),
           cache.v_pages.describe());
  }
  c.shape(cache.v_pages, "cache.v_pages", {kAny, kAny, hkv, codec.value_record_bytes()},
          fmt::format("[num_pages, page_size, Hkv, Vb]: Vb = {} bytes, a {}-bit value record of D = {} in groups of {}",
                      codec.value_record_bytes(), config.bits, d, config.value_group));
  c.dtype(cache.v_pages, "cache.v_pages", DType::u8);
  c.usable(cache.v_pages, "cache.v_pages", device);
  c.shape(cache.k_pages, "cache.k_pages", {num_pages, page_size / g, hkv, codec.key_block_bytes()},
          fmt::format("[num_pages, page_size / G, Hkv, Kb]: G = {}, Kb = {} bytes, a {}-bit key block of D = {}", g,
                      codec.key_block_bytes(), config.bits, d));
  c.dtype(cache.k_pages, "cache.k_pages", DType::u8);
  c.usable(cache.k_pages, "cache.k_pages", device);
  const std::string ring = fmt::format("[B, W, Hkv, D]: W = R + G = {} + {}", config.residual, g);
  for (const auto& [t, name] : {std::pair{&cache.recent_k, "cache.recent_k"}, std::pair{&cache.recent_v, "cache.recent_v"}}) {
    c.shape(*t, name, {batch, config.residual + g, hkv, d}, ring);
    c.dtype(*t, name, DType::f32);
    c.usable(*t, name, device);
  }
  detail::check_page_table(c, cache.page_table, cache.lengths, batch, num_pages, page_size, device, extra,
                           min_length, check_values);
}

}  // namespace

void kivi_append_paged(const Tensor& k_new, const Tensor& v_new, const PagedKiviKV& cache, const RunOptions& run) {
  const ArgCheck c("kivi_append_paged");
  // Host backends only (kivi_cache.h).
  const auto [batch, tokens, hkv, d] = detail::check_new_tokens(c, k_new, v_new, Device::cpu);
  check_cache(c, cache, batch, hkv, d, "k_new", Device::cpu, tokens, 0, run.check_indices);
  dispatch(KiviAppendPagedArgs{k_new, v_new, cache, run.stream}, run, k_new.device);
}

void kivi_decode_attention_paged(const Tensor& q, const PagedKiviKV& cache, const Tensor& out,
                                 const AttentionOptions& options, const RunOptions& run) {
  const ArgCheck c("kivi_decode_attention_paged");
  c.shape(q, "q", {kAny, kAny, kAny}, "[B, Hq, D]");
  c.activation(q, "q");
  // The cache, out and q on one device: host memory, or GPU memory for cuda (kivi_cache.h).
  c.usable(q, "q", q.device);
  if (q.dim(0) < 1 || q.dim(1) < 1) c.fail("q", "B >= 1 and at least one head", q.describe());
  c.head_dim(q.dim(2), "q");
  c.same_shape(out, "out", q, "q");
  c.same_dtype(out, "out", q.dtype, "the dtype of q");
  c.usable(out, "out", q.device);
  const AttentionOptions resolved = detail::resolve_attention_options(c, options, q.dim(2));
  if (cache.v_pages.rank != 4) c.fail("cache.v_pages", "rank 4 [num_pages, page_size, Hkv, Vb]", cache.v_pages.describe());
  c.gqa(q.dim(1), cache.v_pages.dim(2));
  // Every sequence needs a token: a softmax over none has no value.
  check_cache(c, cache, q.dim(0), cache.v_pages.dim(2), q.dim(2), "q", q.device, 0, 1, run.check_indices);
  dispatch(KiviDecodeAttentionPagedArgs{q, cache, out, resolved, run.stream}, run, q.device);
}

}  // namespace decodelab
