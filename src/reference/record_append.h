// The append of the paged record caches (PagedTurboQuantKV, PagedRabitqKV, PagedQjlKV), the
// reference: each new token's key and value are encoded by the cache's own codecs into the records
// of token lengths[b] + s. Shared by turboquant_cache.cpp, rabitq_cache.cpp and qjl_cache.cpp, and
// run over row ranges by the CPU backend (src/cpu/quant.cpp): the codes must be the encoders' bit
// for bit.
#pragma once

#include <vector>

#include "reference/kv_layout.h"

namespace decodelab::reference {

// The sizes of an append's new tokens, k_new = [B, S, Hkv, D] or [B, Hkv, D] (S = 1).
struct NewTokens {
  explicit NewTokens(const Tensor& k_new)
      : batch(k_new.dim(0)), tokens(k_new.rank == 4 ? k_new.dim(1) : 1), heads(k_new.dim(k_new.rank - 2)),
        d(k_new.dim(k_new.rank - 1)) {}
  int64_t batch, tokens, heads, d;
  // The first element of token s of sequence b, KV head h.
  int64_t offset(int64_t b, int64_t s, int64_t h) const { return ((b * tokens + s) * heads + h) * d; }
};

// Rows [row_begin, row_end) of the B * S * Hkv (sequence, new token, KV head) rows of an append
// (Args: TurboQuantAppendPagedArgs, RabitqAppendPagedArgs, QjlAppendPagedArgs: k_new and v_new,
// [B, S, Hkv, D] or [B, Hkv, D] (S = 1), and a cache whose codecs encode them); the rows of one
// token are independent of every other's, so any split of the rows writes the same bytes.
template <class Args>
void append_record_rows(const Args& a, int64_t row_begin, int64_t row_end) {
  const Tensor &k_new = a.k_new, &v_new = a.v_new;
  const auto& cache = a.cache;
  const PagedRecordLayout at(cache);
  const NewTokens n(k_new);
  const int64_t tokens = n.tokens, hkv = n.heads, d = n.d;
  std::vector<float> x(static_cast<size_t>(d));
  // f16 and bf16 widen to f32 exactly: the codec sees the values as stored.
  const auto encode = [&](const Tensor& src, const Tensor& pool, const auto& codec, int64_t row, int64_t index) {
    for (int64_t j = 0; j < d; ++j) x[size_t(j)] = float(load(src, row * d + j));
    codec.encode(x, record_bytes(pool, index));
  };
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / (tokens * hkv), s = row / hkv % tokens, h = row % hkv;
    const int64_t index = at.record(b, h, at.length(b) + s);
    encode(k_new, cache.k_pages, *cache.k_codec, row, index);
    encode(v_new, cache.v_pages, *cache.v_codec, row, index);
  }
}

// The number of rows of append_record_rows.
inline int64_t append_record_row_count(const Tensor& k_new) {
  const NewTokens n(k_new);
  return n.batch * n.tokens * n.heads;
}

// The whole append, in row order on the calling thread (the reference backend's kernel).
template <class Args>
void append_records(const Args& a) {
  append_record_rows(a, 0, append_record_row_count(a.k_new));
}

}  // namespace decodelab::reference
