// Validation and routing of the paged TurboQuant cache ops: the append and fused decode attention
// (include/decodelab/turboquant_cache.h).
#include <fmt/format.h>

#include <string>

#include "decodelab/turboquant_cache.h"
#include "ops/common.h"
#include "router/registry.h"

namespace decodelab {

using detail::ArgCheck;
using detail::kAny;

namespace {

// A codec is given and is for the head_dim of the tokens it will see (a codebook for another D
// would quantize on the wrong scale; a record of another D has another length).
const kvquant::TurboQuantMse& check_codec(const ArgCheck& c, const kvquant::TurboQuantMse* codec, const char* name,
                                          int64_t d, const char* d_of) {
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

// One pool: u8 [num_pages, page_size, Hkv, R], R the record bytes of its codec, so a pool written
// at other bits (or for another D) is refused by its record length.
void check_pool(const ArgCheck& c, const Tensor& pool, const char* name, const kvquant::TurboQuantMse& codec,
                const char* codec_name, int64_t num_pages, int64_t page_size, int64_t hkv, Device device) {
  const std::string layout = fmt::format("[num_pages, page_size, Hkv, R]: R = {} bytes, a {}-bit record of D = {} ({})",
                                         codec.record_bytes(), codec.config().bits, codec.config().head_dim, codec_name);
  c.shape(pool, name, {num_pages, page_size, hkv, codec.record_bytes()}, layout);
  c.dtype(pool, name, DType::u8);
  c.usable(pool, name, device);
}

// The whole cache against B sequences of Hkv heads of dimension D, on `device`; with
// check_values, every lengths[b] + extra fits the page table and every page it covers is a page of
// the pools.
void check_cache(const ArgCheck& c, const PagedTurboQuantKV& cache, int64_t batch, int64_t hkv, int64_t d,
                 const char* d_of, Device device, int64_t extra, int64_t min_length, bool check_values) {
  const kvquant::TurboQuantMse& k_codec = check_codec(c, cache.k_codec, "cache.k_codec", d, d_of);
  const kvquant::TurboQuantMse& v_codec = check_codec(c, cache.v_codec, "cache.v_codec", d, d_of);
  if (cache.k_pages.rank != 4) c.fail("cache.k_pages", "rank 4 [num_pages, page_size, Hkv, R]", cache.k_pages.describe());
  const int64_t num_pages = cache.k_pages.dim(0), page_size = cache.k_pages.dim(1);
  if (page_size < 1) c.fail("cache.k_pages", "page_size >= 1", cache.k_pages.describe());
  check_pool(c, cache.k_pages, "cache.k_pages", k_codec, "cache.k_codec", kAny, kAny, hkv, device);
  check_pool(c, cache.v_pages, "cache.v_pages", v_codec, "cache.v_codec", num_pages, page_size, hkv, device);
  detail::check_page_table(c, cache.page_table, cache.lengths, batch, num_pages, page_size, device, extra,
                           min_length, check_values);
}

// x = [B, H, D] in an activation dtype; its device is the call's (the codecs stay host objects:
// the CUDA backend uploads what its kernels need of them).
void check_heads(const ArgCheck& c, const Tensor& x, const char* name, const char* layout) {
  c.shape(x, name, {kAny, kAny, kAny}, layout);
  c.activation(x, name);
  c.usable(x, name, x.device);
  if (x.dim(0) < 1 || x.dim(1) < 1) c.fail(name, "B >= 1 and at least one head", x.describe());
  c.head_dim(x.dim(2), name);
}

}  // namespace

void turboquant_append_paged(const Tensor& k_new, const Tensor& v_new, const PagedTurboQuantKV& cache,
                             const RunOptions& run) {
  const ArgCheck c("turboquant_append_paged");
  check_heads(c, k_new, "k_new", "[B, Hkv, D]");
  c.same_shape(v_new, "v_new", k_new, "k_new");
  c.same_dtype(v_new, "v_new", k_new.dtype, "the dtype of k_new");
  c.usable(v_new, "v_new", k_new.device);
  check_cache(c, cache, k_new.dim(0), k_new.dim(1), k_new.dim(2), "k_new", k_new.device, 1, 0, run.check_indices);
  dispatch(TurboQuantAppendPagedArgs{k_new, v_new, cache, run.stream}, run, k_new.device);
}

void turboquant_decode_attention_paged(const Tensor& q, const PagedTurboQuantKV& cache, const Tensor& out,
                                       const AttentionOptions& options, const RunOptions& run) {
  const ArgCheck c("turboquant_decode_attention_paged");
  check_heads(c, q, "q", "[B, Hq, D]");
  c.same_shape(out, "out", q, "q");
  c.same_dtype(out, "out", q.dtype, "the dtype of q");
  c.usable(out, "out", q.device);
  const AttentionOptions resolved = detail::resolve_attention_options(c, options, q.dim(2));
  if (cache.k_pages.rank != 4) c.fail("cache.k_pages", "rank 4 [num_pages, page_size, Hkv, R]", cache.k_pages.describe());
  c.gqa(q.dim(1), cache.k_pages.dim(2));
  // Every sequence needs a token: a softmax over none has no value.
  check_cache(c, cache, q.dim(0), cache.k_pages.dim(2), q.dim(2), "q", q.device, 0, 1, run.check_indices);
  dispatch(TurboQuantDecodeAttentionPagedArgs{q, cache, out, resolved, run.stream}, run, q.device);
}

}  // namespace decodelab
