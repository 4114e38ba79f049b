// Where the reference finds token t of sequence b, KV head h, in each kind of K/V storage: the
// one statement of the cache layouts in kv_cache.h that reference appends and attention share.
#pragma once

#include <span>

#include "decodelab/kv_cache.h"
#include "kvquant/record.h"
#include "reference/elements.h"

namespace decodelab::reference {

// Prefill K and V: [B, S, Hkv, D].
struct PrefillKVLayout {
  const Tensor& k;
  const Tensor& v;
  int64_t heads() const { return k.dim(2); }
  int64_t length(int64_t) const { return k.dim(1); }
  int64_t offset(int64_t b, int64_t h, int64_t t) const {
    return ((b * k.dim(1) + t) * k.dim(2) + h) * k.dim(3);
  }
};

// Contiguous cache: [B, Hkv, S_max, D] and lengths.
struct ContiguousKVLayout {
  explicit ContiguousKVLayout(const ContiguousKV& c) : k(c.k), v(c.v), lengths(c.lengths) {}
  const Tensor& k;
  const Tensor& v;
  const Tensor& lengths;
  int64_t heads() const { return k.dim(1); }
  int64_t length(int64_t b) const { return load_index(lengths, b); }
  int64_t offset(int64_t b, int64_t h, int64_t t) const {
    return ((b * k.dim(1) + h) * k.dim(2) + t) * k.dim(3);
  }
};

// The slot of token t of sequence b in a paged pool [num_pages, page_size, ...]: its page's first
// slot plus t's place in the page. Shared by the f16 and the TurboQuant paged layouts.
inline int64_t paged_slot(const Tensor& page_table, int64_t page_size, int64_t b, int64_t t) {
  const int64_t page = load_index(page_table, b * page_table.dim(1) + t / page_size);
  return page * page_size + t % page_size;
}

// Paged cache: pools [num_pages, page_size, Hkv, D], page_table [B, max_pages], lengths.
struct PagedKVLayout {
  explicit PagedKVLayout(const PagedKV& c)
      : k(c.k_pages), v(c.v_pages), lengths(c.lengths), page_table(c.page_table) {}
  const Tensor& k;
  const Tensor& v;
  const Tensor& lengths;
  const Tensor& page_table;
  int64_t heads() const { return k.dim(2); }
  int64_t length(int64_t b) const { return load_index(lengths, b); }
  int64_t offset(int64_t b, int64_t h, int64_t t) const {
    return (paged_slot(page_table, k.dim(1), b, t) * k.dim(2) + h) * k.dim(3);
  }
};

// Paged caches of records (PagedTurboQuantKV, PagedRabitqKV): pools [num_pages, page_size, Hkv, R]
// of R-byte records. record() is the index of a token's record in its pool, so its bytes start at
// record() * R (R of that pool).
struct PagedRecordLayout {
  template <class Cache>
  explicit PagedRecordLayout(const Cache& c)
      : k(c.k_pages), lengths(c.lengths), page_table(c.page_table) {}
  const Tensor& k;
  const Tensor& lengths;
  const Tensor& page_table;
  int64_t heads() const { return k.dim(2); }
  int64_t length(int64_t b) const { return load_index(lengths, b); }
  int64_t record(int64_t b, int64_t h, int64_t t) const { return paged_slot(page_table, k.dim(1), b, t) * k.dim(2) + h; }
};

// The record bytes of record `index` of a pool [num_pages, page_size, Hkv, R].
inline std::span<uint8_t> record_bytes(const Tensor& pool, int64_t index) {
  const int64_t r = pool.dim(3);
  return {pool.ptr<uint8_t>() + index * r, size_t(r)};
}

// The TurboQuant record of token t of sequence b, KV head h, whose norm must be valid
// (turboquant_cache.h); `op` names the op in the error.
inline std::span<uint8_t> checked_turboquant_record(const char* op, const Tensor& pool, const char* pool_name,
                                                    int64_t index, int64_t b, int64_t t, int64_t h) {
  const std::span<uint8_t> record = record_bytes(pool, index);
  const float norm = detail::load_f32_le(record.data());
  if (!detail::is_valid_norm(norm)) detail::fail_paged_record_norm(detail::ArgCheck(op), pool_name, b, t, h, norm);
  return record;
}

}  // namespace decodelab::reference
