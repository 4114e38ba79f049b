// KV caches (contiguous and paged), appending to them, and splitting a fused QKV projection.
//
// Ops never change `lengths`: an append writes the new tokens of sequence b at positions
// lengths[b] .. lengths[b] + S - 1, and the owner of the cache advances lengths afterwards
// (PagedKVCache does that for its sequences). Attention reads lengths[b] tokens.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "decodelab/layers.h"
#include "decodelab/router.h"
#include "decodelab/tensor.h"

namespace decodelab {

// K and V: [B, Hkv, S_max, D]; lengths: [B] i32, each in [0, S_max].
struct ContiguousKV {
  Tensor k;
  Tensor v;
  Tensor lengths;
};

// K and V pools: [num_pages, page_size, Hkv, D]. page_table: [B, max_pages] i32, the pages of
// sequence b in order (entries past the last used page are ignored). lengths: [B] i32.
// Token t of sequence b lives in page page_table[b, t / page_size], slot t % page_size.
struct PagedKV {
  Tensor k_pages;
  Tensor v_pages;
  Tensor page_table;
  Tensor lengths;
};

// Writes k_new, v_new = [B, S, Hkv, D] into the cache at lengths[b] + s.
void kv_append(const Tensor& k_new, const Tensor& v_new, const ContiguousKV& cache,
               const RunOptions& run = {});
void kv_append_paged(const Tensor& k_new, const Tensor& v_new, const PagedKV& cache,
                     const RunOptions& run = {});

// qkv = [..., (Hq + 2*Hkv) * D], the Q heads then the K heads then the V heads, into
// q = [..., Hq, D], k = [..., Hkv, D], v = [..., Hkv, D].
void qkv_split(const Tensor& qkv, const Tensor& q, const Tensor& k, const Tensor& v,
               const RunOptions& run = {});

// qkv_split, then RoPE on q and k at `positions` (i32, one per token).
void qkv_split_rope(const Tensor& qkv, const Tensor& positions, const RopeParams& rope,
                    const Tensor& q, const Tensor& k, const Tensor& v, const RunOptions& run = {});

// The decode-step fusion: qkv = [B, S, (Hq + 2*Hkv) * D] is split, q and k are rotated at
// positions lengths[b] + s, q goes to q_out = [B, S, Hq, D] and k, v are appended to the cache.
void qkv_rope_append(const Tensor& qkv, const RopeParams& rope, const ContiguousKV& cache,
                     const Tensor& q_out, const RunOptions& run = {});
void qkv_rope_append_paged(const Tensor& qkv, const RopeParams& rope, const PagedKV& cache,
                           const Tensor& q_out, const RunOptions& run = {});

// Owns a paged KV cache for many sequences: the page pools, a free list, per-sequence page
// tables and lengths. Pages are reference-counted so that fork() shares a prefix; a shared
// partially-filled last page is copied before it is written (copy-on-write).
// Running out of pages (or of sequence slots, or of page-table width) throws and changes nothing.
class PagedKVCache {
 public:
  struct Config {
    int64_t num_pages = 0;
    int64_t page_size = 16;
    int64_t num_kv_heads = 0;
    int64_t head_dim = 0;
    DType dtype = DType::f16;
    int64_t max_sequences = 1;
    int64_t max_pages_per_sequence = 0;  // 0 = num_pages
    Device device = Device::cpu;
    // false: pages, page tables and lengths only, for a caller whose own pools of another layout
    // follow these pages (LlamaDecoder's TurboQuant layers); k_pages() and v_pages() are empty,
    // num_kv_heads, head_dim and dtype are not used, and fork() is refused (its copy-on-write
    // would copy pools it does not have).
    bool pools = true;
  };

  explicit PagedKVCache(const Config& config);

  // A new empty sequence; returns its id.
  int add_sequence();
  // A new sequence holding the same tokens as `seq`, sharing its pages.
  int fork(int seq);
  // Releases the sequence and every page no other sequence shares.
  void free(int seq);

  // Makes room for `new_tokens` more tokens in each of `seqs`: all of them or none.
  void reserve(std::span<const int> seqs, int64_t new_tokens);
  // The kernel view of `seqs` in that order, with their current lengths. Valid until the next
  // call that changes the cache.
  PagedKV view(std::span<const int> seqs);
  // The same page table and lengths written into the caller's host tensors instead: page_table
  // [>= len(seqs), max_pages_per_sequence] and lengths [>= len(seqs)], int32, first rows (for a
  // caller that keeps them at fixed addresses, as a CUDA graph needs).
  void write_view(std::span<const int> seqs, const Tensor& page_table, const Tensor& lengths) const;
  // Records that `new_tokens` more tokens were written to each of `seqs` (after reserve).
  void advance(std::span<const int> seqs, int64_t new_tokens);

  // reserve + kv_append_paged + advance, for k_new, v_new = [len(seqs), S, Hkv, D].
  void append(std::span<const int> seqs, const Tensor& k_new, const Tensor& v_new,
              const RunOptions& run = {});

  int64_t length(int seq) const;
  std::span<const int32_t> pages(int seq) const;
  int64_t free_pages() const { return int64_t(free_list_.size()); }
  const Config& config() const { return config_; }
  const Tensor& k_pages() const { return k_pages_.view(); }
  const Tensor& v_pages() const { return v_pages_.view(); }

 private:
  struct Sequence {
    bool live = false;
    int64_t length = 0;
    int64_t reserved = 0;  // tokens the pages can hold
    std::vector<int32_t> pages;
  };
  Sequence& sequence(int seq, const char* op);
  const Sequence& sequence(int seq, const char* op) const;
  int32_t take_page();
  void release_page(int32_t page);
  void copy_page(int32_t dst, int32_t src);

  Config config_;
  Array k_pages_;
  Array v_pages_;
  std::vector<int32_t> free_list_;
  std::vector<int32_t> refcount_;
  std::vector<Sequence> sequences_;
  Array view_page_table_;
  Array view_lengths_;
};

}  // namespace decodelab
