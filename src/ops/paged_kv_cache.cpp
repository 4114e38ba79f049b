// PagedKVCache: page pools, a free list, per-sequence page tables with reference-counted pages
// (so forks share prefixes) and copy-on-write of a shared, partially filled last page.
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "core/check.h"
#include "decodelab/kv_cache.h"

namespace decodelab {

using detail::ArgCheck;

PagedKVCache::PagedKVCache(const Config& config) : config_(config) {
  const ArgCheck c("PagedKVCache");
  if (config.num_pages < 1) c.fail("num_pages", ">= 1", std::to_string(config.num_pages));
  if (config.page_size < 1) c.fail("page_size", ">= 1", std::to_string(config.page_size));
  if (config.pools) {
    if (config.num_kv_heads < 1) c.fail("num_kv_heads", ">= 1", std::to_string(config.num_kv_heads));
    c.head_dim(config.head_dim, "head_dim");
    if (!is_float_activation(config.dtype)) c.fail("dtype", "f32, f16 or bf16", dtype_name(config.dtype));
  }
  if (config.max_sequences < 1) c.fail("max_sequences", ">= 1", std::to_string(config.max_sequences));
  if (config_.max_pages_per_sequence == 0) config_.max_pages_per_sequence = config.num_pages;
  if (config_.max_pages_per_sequence < 1) {
    c.fail("max_pages_per_sequence", ">= 1 (or 0 for num_pages)", std::to_string(config.max_pages_per_sequence));
  }
  if (config.pools) {
    const int64_t shape[] = {config.num_pages, config.page_size, config.num_kv_heads, config.head_dim};
    k_pages_ = Array(config.dtype, shape, config.device);
    v_pages_ = Array(config.dtype, shape, config.device);
    // Zeros, not garbage, in a position that was reserved but never written (LlamaDecoder::skip).
    zero_bytes(k_pages_);
    zero_bytes(v_pages_);
  }
  // Pages are handed out lowest index first.
  for (int64_t p = config.num_pages - 1; p >= 0; --p) free_list_.push_back(int32_t(p));
  refcount_.assign(size_t(config.num_pages), 0);
  sequences_.resize(size_t(config.max_sequences));
}

PagedKVCache::Sequence& PagedKVCache::sequence(int seq, const char* op) {
  return const_cast<Sequence&>(std::as_const(*this).sequence(seq, op));
}

const PagedKVCache::Sequence& PagedKVCache::sequence(int seq, const char* op) const {
  if (seq < 0 || size_t(seq) >= sequences_.size() || !sequences_[size_t(seq)].live) {
    ArgCheck(op).fail("seq", "the id of a live sequence", std::to_string(seq));
  }
  return sequences_[size_t(seq)];
}

int PagedKVCache::add_sequence() {
  for (size_t i = 0; i < sequences_.size(); ++i) {
    if (!sequences_[i].live) {
      sequences_[i] = Sequence{true, 0, 0, {}};
      return int(i);
    }
  }
  ArgCheck("PagedKVCache::add_sequence")
      .fail("max_sequences", fmt::format("a free sequence slot of {}", sequences_.size()), "all in use");
}

int PagedKVCache::fork(int seq) {
  const Sequence source = sequence(seq, "PagedKVCache::fork");
  if (!config_.pools) {
    ArgCheck("PagedKVCache::fork").fail("config.pools", "true (copy-on-write copies the pools)", "false");
  }
  const int child = add_sequence();
  Sequence& s = sequences_[size_t(child)];
  s.length = source.length;
  s.pages = source.pages;
  s.reserved = int64_t(s.pages.size()) * config_.page_size;
  for (int32_t p : s.pages) ++refcount_[size_t(p)];
  return child;
}

void PagedKVCache::free(int seq) {
  Sequence& s = sequence(seq, "PagedKVCache::free");
  for (int32_t p : s.pages) release_page(p);
  s = Sequence{};
}

int32_t PagedKVCache::take_page() {
  const int32_t p = free_list_.back();
  free_list_.pop_back();
  refcount_[size_t(p)] = 1;
  return p;
}

void PagedKVCache::release_page(int32_t page) {
  if (--refcount_[size_t(page)] == 0) free_list_.push_back(page);
}

void PagedKVCache::copy_page(int32_t dst, int32_t src) {
  const int64_t page_elems = config_.page_size * config_.num_kv_heads * config_.head_dim;
  for (const Array* pool : {&k_pages_, &v_pages_}) {
    const size_t bytes = size_t(page_elems) * dtype_size(config_.dtype);
    auto at = [&](int32_t p) { return static_cast<char*>(pool->data()) + size_t(p) * bytes; };
    copy_bytes(Tensor::contiguous(at(dst), DType::u8, {int64_t(bytes)}, config_.device),
               Tensor::contiguous(at(src), DType::u8, {int64_t(bytes)}, config_.device));
  }
}

void PagedKVCache::reserve(std::span<const int> seqs, int64_t new_tokens) {
  const ArgCheck c("PagedKVCache::reserve");
  if (new_tokens < 0) c.fail("new_tokens", ">= 0", std::to_string(new_tokens));
  // Count first, change nothing until everything fits.
  int64_t needed = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& s = sequence(seqs[i], "PagedKVCache::reserve");
    if (std::count(seqs.begin(), seqs.end(), seqs[i]) > 1) c.fail("seqs", "distinct sequence ids", std::to_string(seqs[i]));
    const int64_t pages_after = (s.length + new_tokens + config_.page_size - 1) / config_.page_size;
    if (pages_after > config_.max_pages_per_sequence) {
      c.fail(fmt::format("seqs[{}]", i),
             fmt::format("at most {} pages per sequence", config_.max_pages_per_sequence),
             fmt::format("{} pages for {} + {} tokens", pages_after, s.length, new_tokens));
    }
    needed += std::max<int64_t>(0, pages_after - int64_t(s.pages.size()));
    if (new_tokens > 0 && s.length % config_.page_size != 0 && refcount_[size_t(s.pages.back())] > 1) {
      ++needed;  // the shared partial page is copied before it is written
    }
  }
  if (needed > free_pages()) {
    c.fail("num_pages", fmt::format("{} free pages for this reservation", needed),
           fmt::format("{} free of {}", free_pages(), config_.num_pages));
  }
  for (int seq : seqs) {
    Sequence& s = sequences_[size_t(seq)];
    if (new_tokens > 0 && s.length % config_.page_size != 0) {
      int32_t& last = s.pages[size_t(s.length / config_.page_size)];
      if (refcount_[size_t(last)] > 1) {
        const int32_t copy = take_page();
        copy_page(copy, last);
        release_page(last);
        last = copy;
      }
    }
    const int64_t pages_after = (s.length + new_tokens + config_.page_size - 1) / config_.page_size;
    while (int64_t(s.pages.size()) < pages_after) s.pages.push_back(take_page());
    s.reserved = int64_t(s.pages.size()) * config_.page_size;
  }
}

void PagedKVCache::write_view(std::span<const int> seqs, const Tensor& page_table, const Tensor& lengths) const {
  const ArgCheck c("PagedKVCache::write_view");
  const int64_t batch = int64_t(seqs.size()), width = config_.max_pages_per_sequence;
  if (batch < 1) c.fail("seqs", "at least one sequence", "none");
  if (page_table.dtype != DType::i32 || page_table.device != Device::cpu || page_table.rank != 2 ||
      page_table.dim(0) < batch || page_table.dim(1) != width || !page_table.is_contiguous()) {
    c.fail("page_table", fmt::format("[>= {}, {}] i32 on the host", batch, width), page_table.describe());
  }
  if (lengths.dtype != DType::i32 || lengths.device != Device::cpu || lengths.rank != 1 || lengths.dim(0) < batch ||
      !lengths.is_contiguous()) {
    c.fail("lengths", fmt::format("[>= {}] i32 on the host", batch), lengths.describe());
  }
  for (int64_t b = 0; b < batch; ++b) {
    const Sequence& s = sequence(seqs[size_t(b)], "PagedKVCache::write_view");
    int32_t* row = page_table.ptr<int32_t>() + b * width;
    std::fill(row, row + width, 0);
    std::copy(s.pages.begin(), s.pages.end(), row);
    lengths.ptr<int32_t>()[b] = int32_t(s.length);
  }
}

PagedKV PagedKVCache::view(std::span<const int> seqs) {
  if (seqs.empty()) ArgCheck("PagedKVCache::view").fail("seqs", "at least one sequence", "none");
  const int64_t batch = int64_t(seqs.size());
  Array table(DType::i32, {batch, config_.max_pages_per_sequence}), lengths(DType::i32, {batch});
  write_view(seqs, table, lengths);
  view_page_table_ = table.to(config_.device);
  view_lengths_ = lengths.to(config_.device);
  return PagedKV{k_pages_.view(), v_pages_.view(), view_page_table_.view(), view_lengths_.view()};
}

void PagedKVCache::advance(std::span<const int> seqs, int64_t new_tokens) {
  const ArgCheck c("PagedKVCache::advance");
  for (int seq : seqs) {
    const Sequence& s = sequence(seq, "PagedKVCache::advance");
    if (new_tokens < 0 || s.length + new_tokens > s.reserved) {
      c.fail("new_tokens", fmt::format("0..{} (reserved room)", s.reserved - s.length), std::to_string(new_tokens));
    }
  }
  for (int seq : seqs) sequences_[size_t(seq)].length += new_tokens;
}

void PagedKVCache::append(std::span<const int> seqs, const Tensor& k_new, const Tensor& v_new, const RunOptions& run) {
  const ArgCheck c("PagedKVCache::append");
  if (k_new.rank != 4 || k_new.dim(0) != int64_t(seqs.size())) {
    c.fail("k_new", fmt::format("[{}, S, Hkv, D], one row per sequence", seqs.size()), k_new.describe());
  }
  // Checked before pages are reserved, so that a bad call changes nothing.
  c.shape(k_new, "k_new", {int64_t(seqs.size()), detail::kAny, config_.num_kv_heads, config_.head_dim}, "[B, S, Hkv, D]");
  c.same_shape(v_new, "v_new", k_new, "k_new");
  c.same_dtype(k_new, "k_new", config_.dtype, "the cache dtype");
  c.same_dtype(v_new, "v_new", config_.dtype, "the cache dtype");
  reserve(seqs, k_new.dim(1));
  kv_append_paged(k_new, v_new, view(seqs), run);
  advance(seqs, k_new.dim(1));
}

int64_t PagedKVCache::length(int seq) const { return sequence(seq, "PagedKVCache::length").length; }

std::span<const int32_t> PagedKVCache::pages(int seq) const { return sequence(seq, "PagedKVCache::pages").pages; }

}  // namespace decodelab
