#include "ops/common.h"

#include <fmt/format.h>

#include <cmath>

namespace decodelab::detail {

std::vector<int32_t> read_i32(const Tensor& t) {
  std::vector<int32_t> values(static_cast<size_t>(t.numel()));
  copy_bytes(Tensor::contiguous(values.data(), DType::i32, {t.numel()}),
             Tensor::contiguous(t.data, DType::i32, {t.numel()}, t.device));
  return values;
}

namespace {

void check_lengths(const ArgCheck& check, const Tensor& lengths, int64_t batch, Device device) {
  check.shape(lengths, "lengths", {batch}, "[B]");
  check.dtype(lengths, "lengths", DType::i32);
  check.usable(lengths, "lengths", device);
}

void check_length_values(const ArgCheck& check, const std::vector<int32_t>& lengths,
                         int64_t capacity, int64_t extra, int64_t min_length) {
  for (size_t b = 0; b < lengths.size(); ++b) {
    const int64_t len = lengths[b];
    if (len < min_length || len + extra > capacity) {
      check.fail(fmt::format("lengths[{}]", b),
                 extra > 0 ? fmt::format("a length in [0, {}] so that {} new tokens fit", capacity - extra, extra)
                           : fmt::format("a length in [{}, {}]", min_length, capacity),
                 std::to_string(len));
    }
  }
}

}  // namespace

void check_contiguous_kv(const ArgCheck& check, const ContiguousKV& cache, int64_t batch, int64_t hkv, int64_t d,
                         DType dtype, Device device, int64_t extra, int64_t min_length, bool check_values) {
  check.shape(cache.k, "cache.k", {batch, hkv, kAny, d}, "[B, Hkv, S_max, D]");
  check.same_shape(cache.v, "cache.v", cache.k, "cache.k");
  check.same_dtype(cache.k, "cache.k", dtype, "the dtype of the queries/new tokens");
  check.same_dtype(cache.v, "cache.v", dtype, "the dtype of the queries/new tokens");
  check.usable(cache.k, "cache.k", device);
  check.usable(cache.v, "cache.v", device);
  check_lengths(check, cache.lengths, batch, device);
  if (!check_values) return;
  check_length_values(check, read_i32(cache.lengths), cache.k.dim(2), extra, min_length);
}

void check_paged_kv(const ArgCheck& check, const PagedKV& cache, int64_t batch, int64_t hkv, int64_t d, DType dtype,
                    Device device, int64_t extra, int64_t min_length, bool check_values) {
  check.shape(cache.k_pages, "cache.k_pages", {kAny, kAny, hkv, d}, "[num_pages, page_size, Hkv, D]");
  check.same_shape(cache.v_pages, "cache.v_pages", cache.k_pages, "cache.k_pages");
  check.same_dtype(cache.k_pages, "cache.k_pages", dtype, "the dtype of the queries/new tokens");
  check.same_dtype(cache.v_pages, "cache.v_pages", dtype, "the dtype of the queries/new tokens");
  check.usable(cache.k_pages, "cache.k_pages", device);
  check.usable(cache.v_pages, "cache.v_pages", device);
  const int64_t num_pages = cache.k_pages.dim(0), page_size = cache.k_pages.dim(1);
  if (page_size < 1) check.fail("cache.k_pages", "page_size >= 1", cache.k_pages.describe());
  check_page_table(check, cache.page_table, cache.lengths, batch, num_pages, page_size, device, extra, min_length,
                   check_values);
}

void check_page_table(const ArgCheck& check, const Tensor& page_table, const Tensor& lengths_tensor, int64_t batch,
                      int64_t num_pages, int64_t page_size, Device device, int64_t extra, int64_t min_length,
                      bool check_values) {
  check.shape(page_table, "cache.page_table", {batch, kAny}, "[B, max_pages]");
  check.dtype(page_table, "cache.page_table", DType::i32);
  check.usable(page_table, "cache.page_table", device);
  check_lengths(check, lengths_tensor, batch, device);
  if (!check_values) return;
  const std::vector<int32_t> lengths = read_i32(lengths_tensor);
  const int64_t max_pages = page_table.dim(1);
  check_length_values(check, lengths, max_pages * page_size, extra, min_length);
  const std::vector<int32_t> table = read_i32(page_table);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t used = (lengths[size_t(b)] + extra + page_size - 1) / page_size;
    for (int64_t p = 0; p < used; ++p) {
      const int32_t page = table[size_t(b * max_pages + p)];
      if (page < 0 || page >= num_pages) {
        check.fail(fmt::format("cache.page_table[{}, {}]", b, p),
                   fmt::format("a page index in [0, {})", num_pages), std::to_string(page));
      }
    }
  }
}

void check_positions(const ArgCheck& check, const Tensor& positions, int64_t tokens, Device device,
                     bool check_values, std::string_view tokens_of) {
  check.dtype(positions, "positions", DType::i32);
  check.usable(positions, "positions", device);
  if (positions.numel() != tokens) {
    check.fail("positions", fmt::format("{} positions, one per token{}", tokens, tokens_of), positions.describe());
  }
  if (!check_values) return;
  const std::vector<int32_t> values = read_i32(positions);
  for (size_t t = 0; t < values.size(); ++t) {
    if (values[t] < 0) check.fail(fmt::format("positions[{}]", t), "a position >= 0", std::to_string(values[t]));
  }
}

AttentionOptions resolve_attention_options(const ArgCheck& check, const AttentionOptions& options, int64_t head_dim) {
  AttentionOptions resolved = options;
  if (resolved.scale == 0.0f) resolved.scale = float(1.0 / std::sqrt(double(head_dim)));
  if (!std::isfinite(resolved.scale) || resolved.scale < 0.0f) {
    check.fail("options.scale", "a finite scale > 0 (or 0 for 1/sqrt(D))", fmt::format("{}", options.scale));
  }
  return resolved;
}

RopeParams check_rope(const ArgCheck& check, const RopeParams& params, int64_t head_dim) {
  RopeParams p = params;
  if (p.rotary_dim == 0) p.rotary_dim = int(head_dim);
  if (p.rotary_dim < 2 || p.rotary_dim % 2 != 0 || p.rotary_dim > head_dim) {
    check.fail("rope.rotary_dim", fmt::format("an even number in [2, head_dim = {}] (or 0)", head_dim),
               std::to_string(params.rotary_dim));
  }
  if (!(p.theta > 1.0f) || !std::isfinite(p.theta)) {
    check.fail("rope.theta", "a finite base > 1", fmt::format("{}", p.theta));
  }
  if (p.llama3_scaling) {
    const Llama3Scaling& s = p.llama3;
    if (!(s.factor >= 1.0f) || !(s.low_freq_factor > 0.0f) || !(s.high_freq_factor > s.low_freq_factor) ||
        s.original_max_position <= 0) {
      check.fail("rope.llama3", "factor >= 1, 0 < low_freq_factor < high_freq_factor, original_max_position > 0",
                 fmt::format("factor {}, low {}, high {}, original {}", s.factor, s.low_freq_factor,
                             s.high_freq_factor, s.original_max_position));
    }
  }
  return p;
}

}  // namespace decodelab::detail
