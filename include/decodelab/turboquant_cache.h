// A paged KV cache of TurboQuant (MSE) records (kvquant.h), the op that appends new tokens to it
// and fused decode attention over it (issue 5, item 8).
//
// Layout. The same pages, page table and lengths as PagedKV (kv_cache.h), with each token's
// [Hkv, D] head vectors replaced by [Hkv] records:
//   k_pages: u8 [num_pages, page_size, Hkv, Rk], Rk = k_codec->record_bytes() = 4 + ceil(D * bk / 8)
//   v_pages: u8 [num_pages, page_size, Hkv, Rv], Rv = v_codec->record_bytes() = 4 + ceil(D * bv / 8)
//   page_table: i32 [B, max_pages]; lengths: i32 [B].
// The key record of token t of sequence b, KV head h starts at byte
//   ((page_table[b, t / page_size] * page_size + t % page_size) * Hkv + h) * Rk
// of k_pages (values likewise with Rv), and holds TurboQuantMse's record: bytes [0, 4) the norm as
// a little-endian f32, bytes [4, R) the D codebook indices of the rotated direction, bit-packed
// (kvquant.h). Keys and values have their own codec, so their own bits (1-4), rotation seed and
// scale mode; both have the queries' head_dim. A split (fractional) width (high_bits_channels =
// h > 0, kvquant.h: 2.5 or 3.5 bits) is taken where h is a multiple of 16 (the fused cpu kernel
// expands 16 indices at a time); the cuda attention takes h a multiple of 32 (its chunks of 32
// coordinates each lie in one run of indices), the cuda append any such h.
// At D = 128 a 4-bit token costs 68 + 68 bytes per KV head against 512 in f16, a 2-bit one 36 + 36,
// a 2.5-bit one 44 + 44.
//
// As with PagedKV, ops never change `lengths`: the owner of the cache advances them after an
// append. The codecs are host objects; the tensors live on the device of the backend (host memory
// for cpu and reference, GPU memory for cuda, which uploads each codec's rotation once and passes
// its codebook by value: src/cuda/turboquant_tables.h).
#pragma once

#include "decodelab/attention.h"
#include "decodelab/kvquant.h"
#include "decodelab/router.h"
#include "decodelab/tensor.h"

namespace decodelab {

struct PagedTurboQuantKV {
  Tensor k_pages;
  Tensor v_pages;
  Tensor page_table;
  Tensor lengths;
  const kvquant::TurboQuantMse* k_codec = nullptr;  // owned by the caller, alive for the call
  const kvquant::TurboQuantMse* v_codec = nullptr;
};

// One new token per sequence: k_new, v_new = [B, Hkv, D] (f32, f16 or bf16) are encoded into the
// records of token lengths[b] of each sequence b, exactly as k_codec->encode and v_codec->encode
// encode the values widened to f32 (every backend writes the same bytes).
void turboquant_append_paged(const Tensor& k_new, const Tensor& v_new, const PagedTurboQuantKV& cache,
                             const RunOptions& run = {});

// Decode attention of one query per sequence over the lengths[b] >= 1 tokens of the cache:
// q, out = [B, Hq, D] (f32, f16 or bf16), Hq a multiple of Hkv (query head h reads KV head
// h / (Hq / Hkv)); options.scale as in decode_attention (0 = 1/sqrt(D)); options.causal has no
// effect with one query. The result is attention over the decoded keys and values, computed
// without decoding them: with q' = R_K q once per query head, token t scores
//   scale * n_t * s_t * sum_j q'_j c_K[idx_tj]
// (n_t the record's norm, s_t = 1 in plain mode and 1 / ||c_K[idx_t]|| norm-corrected), the
// softmax weights p_t accumulate o' = sum_t p_t n_t s_t c_V[idx_t] in V's rotated domain, and
// out = R_V^T o' is rotated back once per query head.
//
// The argument checks cannot afford to scan the cache, so record contents are checked where they
// are read: a record with a NaN, infinite or negative norm (no encoder writes one, so the cache is
// corrupt) among the lengths[b] tokens read gets an error naming the first in (sequence, KV
// head, token) order, keys before values, instead of a NaN output. Records past lengths[b] are
// never read. The check costs one comparison per record, not a scan. The reference and cpu
// backends check; the cuda backend does not yet (it would need a flag read back after the launch,
// a synchronization per call) and gives NaN or wrong outputs for such a cache.
void turboquant_decode_attention_paged(const Tensor& q, const PagedTurboQuantKV& cache, const Tensor& out,
                                       const AttentionOptions& options = {}, const RunOptions& run = {});

}  // namespace decodelab
